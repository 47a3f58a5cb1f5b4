// One environment: its details and heartbeat, tunnel state, latest snapshot, and live work:
// through the tunnel for a standard environment, queued commands for an async one.

import { useState } from 'preact/hooks';
import { get, post } from '../api';
import type { Environment, NewCommand } from '../types';
import { useCatalog } from '../lib/catalog';
import { useNow, useResource } from '../lib/hooks';
import { ago, dateTime, duration, seconds } from '../lib/format';
import { href, navigate } from '../lib/router';
import type { Route } from '../lib/router';
import { Badge, Details, ErrorBanner, Loading, useNotify } from '../components/ui';
import { EnvDialogs } from '../components/envDialogs';
import type { EnvDialog } from '../components/envDialogs';
import { LiveContainers } from '../components/LiveContainers';
import { SnapshotPanel } from '../components/Snapshot';
import { CommandHistory, QueueDialog } from '../components/Commands';

export function EnvironmentPage({ id, route }: { id: number; route: Route }) {
  const cat = useCatalog();
  const notify = useNotify();
  const now = useNow(5000);
  const res = useResource((signal) => get<Environment>(`/endpoints/${id}`, undefined, signal), [id], 4000);
  const [dialog, setDialog] = useState<EnvDialog>(null);
  const [commandsVersion, setCommandsVersion] = useState(0);
  const [snapshotVersion, setSnapshotVersion] = useState(0);
  const [queueing, setQueueing] = useState(false);
  const env = res.data;

  if (!Number.isInteger(id) || id < 0) {
    return (
      <div class="page">
        <h1>Not found</h1>
        <p>
          <a href={href('/environments')}>Back to environments</a>
        </p>
      </div>
    );
  }
  if (!env) {
    return (
      <div class="page">
        <p class="crumbs">
          <a href={href('/environments')}>Environments</a>
        </p>
        <h1>{res.errorStatus === 404 ? 'Environment not found' : `Environment ${id}`}</h1>
        <ErrorBanner error={res.error} onRetry={res.errorStatus === 404 ? undefined : () => void res.reload()} />
        {res.loading ? <Loading /> : null}
      </div>
    );
  }

  const queue = async (cmd: NewCommand, what: string) => {
    await post(`/endpoints/${env.id}/commands`, cmd);
    notify(`Queued the ${what}`);
    setCommandsVersion((v) => v + 1);
  };

  const tags = env.tagIds.map((t) => cat.tagName(t)).join(', ');
  const t = env.tunnel;
  return (
    <div class="page" data-testid="environment-page" data-env-id={env.id} data-env-name={env.name}>
      <p class="crumbs">
        <a href={href('/environments')}>Environments</a>
      </p>
      <div class="page-head">
        <h1>
          {env.name} <span class="muted id-suffix">#{env.id}</span>
        </h1>
        <Badge value={env.status} testid="env-page-status" />
        <span class="chip">{env.mode}</span>
        <div class="page-actions">
          <button type="button" class="btn" onClick={() => setDialog({ kind: 'install', env })}>
            Install command
          </button>
          <button type="button" class="btn" onClick={() => setDialog({ kind: 'edit', env })}>
            Edit
          </button>
          <button type="button" class="btn" onClick={() => setDialog({ kind: 'reset', env })}>
            Reset association
          </button>
          <button type="button" class="btn btn-danger-quiet" onClick={() => setDialog({ kind: 'delete', env })}>
            Delete
          </button>
        </div>
      </div>
      <ErrorBanner error={res.error ? `Cannot refresh: ${res.error}` : undefined} onRetry={() => void res.reload()} />

      <section class="panel" aria-labelledby="env-details">
        <h2 id="env-details">Details</h2>
        <div aria-live="polite" class="visually-hidden">
          Status {env.status}
          {env.mode === 'standard' ? `, tunnel ${t.state}` : ''}
        </div>
        <Details
          items={[
            ['Status', <Badge value={env.status} />],
            ['Last check-in', env.lastCheckIn ? <span title={dateTime(env.lastCheckIn)}>{ago(env.lastCheckIn, now)} ({dateTime(env.lastCheckIn)})</span> : 'never'],
            ['Mode', env.mode],
            [
              'Tunnel',
              env.mode === 'standard' ? (
                <span data-testid="tunnel-state">
                  <Badge value={t.state} />
                  {t.gateway ? <span class="muted"> on {t.gateway}</span> : null}
                  {t.since ? (
                    <span class="muted" title={dateTime(t.since)}>
                      , open for {duration(Math.max(1, Math.round((now - Date.parse(t.since)) / 1000)))}
                    </span>
                  ) : null}
                </span>
              ) : (
                <span class="muted">none (async)</span>
              ),
            ],
            ['Edge ID', env.edgeId ? <code>{env.edgeId}</code> : <span class="muted">not bound yet (bound on the first check-in)</span>],
            ['Group', env.groupId ? <a href={href('/environments', { groupId: env.groupId })}>{cat.groupName(env.groupId)}</a> : <span class="muted">none</span>],
            ['Tags', tags || <span class="muted">none</span>],
            [
              'Intervals',
              env.mode === 'standard'
                ? `check-in ${seconds(env.checkinInterval)}`
                : `ping ${seconds(env.pingInterval)}, snapshot ${seconds(env.snapshotInterval)}, commands ${seconds(env.commandInterval)}`,
            ],
            ['Created', dateTime(env.createdAt)],
            ...(env.envVars.length ? ([['Host variables', env.envVars.join(', ')]] as [string, string][]) : []),
            ...(env.allowSelfSigned ? ([['Self-signed API certificate', 'accepted when polling']] as [string, string][]) : []),
          ]}
        />
      </section>

      {env.mode === 'standard' ? (
        <section class="panel" aria-labelledby="env-live">
          <h2 id="env-live">Containers (live)</h2>
          <LiveContainers env={env} onTunnel={() => void res.reload()} />
        </section>
      ) : null}

      <section class="panel" aria-labelledby="env-snapshot">
        <h2 id="env-snapshot">Latest snapshot</h2>
        <SnapshotPanel env={env} section={route.query.get('snap') ?? 'containers'} onQueue={env.mode === 'async' ? queue : undefined} version={snapshotVersion} />
      </section>

      {env.mode === 'async' ? (
        <section class="panel" aria-labelledby="env-commands">
          <div class="panel-head">
            <h2 id="env-commands">Commands</h2>
            <button type="button" class="btn btn-small" onClick={() => setQueueing(true)}>
              Queue a command
            </button>
          </div>
          <CommandHistory env={env} version={commandsVersion} onFinished={() => setSnapshotVersion((v) => v + 1)} />
        </section>
      ) : null}

      {queueing ? <QueueDialog onQueue={queue} onClose={() => setQueueing(false)} /> : null}
      <EnvDialogs
        dialog={dialog}
        setDialog={setDialog}
        onChanged={() => void res.reload()}
        onDeleted={() => navigate('/environments')}
      />
    </div>
  );
}
