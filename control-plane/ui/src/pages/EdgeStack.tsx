// One edge stack: where its rollout stands (batch, counts per status, state), the controls
// (pause, resume, abort, roll back), the environments at each status with their errors, and
// its versions.

import type { ComponentChildren } from 'preact';
import { useState } from 'preact/hooks';
import { del, errorText, get, getPage, post } from '../api';
import type { DeployStatus, EdgeStack, Environment, Rollout, StackStatus, StackVersion } from '../types';
import { DEPLOY_STATUSES } from '../types';
import { useBusy, useNow, useResource } from '../lib/hooks';
import { ago, dateTime, num, words } from '../lib/format';
import { href, navigate } from '../lib/router';
import type { Route } from '../lib/router';
import { Badge, ConfirmDialog, Details, Dialog, Empty, ErrorBanner, FormError, Loading, Pager, SelectField, useNotify } from '../components/ui';
import { NewVersionDialog, TargetsDialog, useEdgeGroups } from '../components/stackForms';
import { pool } from '../lib/pool';

const LIMIT = 25;

/** Names of environments by id, fetched once each. */
const envNames = new Map<number, string>();
async function namesOf(ids: number[], signal: AbortSignal): Promise<void> {
  const missing = ids.filter((id) => !envNames.has(id));
  await pool(missing, 4, async (id) => {
    try {
      const e = await get<Environment>(`/endpoints/${id}`, undefined, signal);
      envNames.set(id, e.name);
    } catch {
      envNames.set(id, `#${id}`);
    }
  });
}

const STATUS_CLASS: Record<string, string> = {
  running: 'seg-ok',
  error: 'seg-bad',
  pending: 'seg-muted',
  removed: 'seg-muted',
};

function CountsBar({ counts, total }: { counts: Record<string, number>; total: number }) {
  if (total <= 0) return null;
  return (
    <div class="statusbar statusbar-tall" aria-hidden="true">
      {DEPLOY_STATUSES.map((s) =>
        counts[s] ? <span key={s} class={`seg ${STATUS_CLASS[s] ?? 'seg-wait'}`} style={{ width: `${(100 * counts[s]) / total}%` }} title={`${words(s)}: ${counts[s]}`} /> : null,
      )}
    </div>
  );
}

function RolloutPanel({ stack, onChanged }: { stack: EdgeStack; onChanged: () => Promise<void> }) {
  const notify = useNotify();
  const now = useNow(2000);
  const [busy, run] = useBusy();
  const [confirm, setConfirm] = useState<'abort' | 'rollback' | null>(null);
  const r: Rollout | undefined = stack.rollout;
  const control = (what: 'pause' | 'resume') =>
    run(async () => {
      try {
        await post(`/edge_stacks/${stack.id}/rollout/${what}`);
        notify(`Rollout of ${stack.name} ${what === 'pause' ? 'paused' : 'resumed'}`);
      } catch (e) {
        notify(`Cannot ${what} the rollout: ${errorText(e)}`, 'error');
      }
      await onChanged();
    });
  const counts = stack.counts ?? {};
  const total = stack.targets ?? Object.values(counts).reduce((a, b) => a + b, 0);
  const c = r?.config;
  return (
    <section class="panel" aria-labelledby="rollout-title" data-testid="rollout-panel">
      <div class="panel-head">
        <h2 id="rollout-title">Rollout</h2>
        <div class="toolbar">
          {r?.state === 'rolling' ? (
            <button type="button" class="btn btn-small" disabled={busy} onClick={() => void control('pause')} data-testid="rollout-pause">
              Pause
            </button>
          ) : null}
          {r?.state === 'paused' ? (
            <button type="button" class="btn btn-small" disabled={busy} onClick={() => void control('resume')} data-testid="rollout-resume">
              Resume
            </button>
          ) : null}
          {r && (r.state === 'rolling' || r.state === 'paused') ? (
            <button type="button" class="btn btn-small btn-danger-quiet" disabled={busy} onClick={() => setConfirm('abort')} data-testid="rollout-abort">
              Abort
            </button>
          ) : null}
          <button type="button" class="btn btn-small" disabled={busy || stack.version < 2} onClick={() => setConfirm('rollback')} data-testid="rollout-rollback">
            Roll back…
          </button>
        </div>
      </div>
      <p class="visually-hidden" aria-live="polite">
        {r ? `Rollout ${words(r.state)}, batch ${r.batch}, ${r.released} released, ${counts.error ?? 0} failed${r.reason ? `: ${r.reason}` : ''}` : ''}
      </p>
      {r ? (
        <div>
          <div class="rollout-head">
            <Badge value={r.state} testid="rollout-state" />
            <span>
              version {r.fromVersion > 0 ? `${r.fromVersion} → ` : ''}
              <strong>{r.targetVersion}</strong>
            </span>
            <span>batch {num(r.batch)}</span>
            <span>
              released {num(r.released)} of {num(total)}
            </span>
            {r.nextBatchAt && r.state === 'rolling' ? <span>next batch {ago(r.nextBatchAt, now)}</span> : null}
          </div>
          {r.reason ? <p class={r.state === 'paused' || r.state === 'rollingBack' || r.state === 'aborted' ? 'banner banner-warn' : 'muted'}>{r.reason}</p> : null}
        </div>
      ) : (
        <p class="muted">No rollout recorded.</p>
      )}
      <CountsBar counts={counts} total={total} />
      <table class="table table-compact" data-testid="status-counts">
        <caption class="visually-hidden">Environments at each status for version {r?.targetVersion ?? stack.version}</caption>
        <thead>
          <tr>
            {DEPLOY_STATUSES.map((s) => (
              <th key={s} scope="col" class="num">
                {words(s)}
              </th>
            ))}
          </tr>
        </thead>
        <tbody>
          <tr>
            {DEPLOY_STATUSES.map((s) => (
              <td key={s} class={s === 'error' && (counts[s] ?? 0) > 0 ? 'num text-bad' : 'num'} data-status={s}>
                {num(counts[s] ?? 0)}
              </td>
            ))}
          </tr>
        </tbody>
      </table>
      {c ? (
        <p class="hint">
          {c.batchSize ? `Batches of ${c.batchSize}${c.batchGrowth === 'double' ? ', doubling' : ''}, ${c.waitSecs ?? 0} s apart, ${c.batchTimeoutSecs ?? 600} s timeout` : 'All at once'}; tolerates{' '}
          {(c.failureThreshold ?? 0) < 1 ? `${Math.round((c.failureThreshold ?? 0) * 1000) / 10} % ` : `${c.failureThreshold} `}
          failures, then {c.onFailure ?? 'pause'}s. Updated {ago(r?.updatedAt, now)}.
        </p>
      ) : null}
      {confirm === 'abort' ? (
        <ConfirmDialog
          title={`Abort the rollout of ${stack.name}?`}
          confirmLabel="Abort rollout"
          danger
          onClose={() => setConfirm(null)}
          onConfirm={async () => {
            await post(`/edge_stacks/${stack.id}/rollout/abort`);
            notify(`Rollout of ${stack.name} aborted`);
            await onChanged();
          }}
        >
          <p>No further batches are released, for good. Environments already released keep the new version.</p>
        </ConfirmDialog>
      ) : null}
      {confirm === 'rollback' ? <RollbackDialog stack={stack} onClose={() => setConfirm(null)} onDone={onChanged} /> : null}
    </section>
  );
}

function RollbackDialog({ stack, onClose, onDone, to }: { stack: EdgeStack; onClose: () => void; onDone: () => Promise<void>; to?: number }) {
  const notify = useNotify();
  const versions = useResource((signal) => get<StackVersion[]>(`/edge_stacks/${stack.id}/versions`, undefined, signal), [stack.id]);
  const [version, setVersion] = useState<string>(to ? String(to) : '');
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const options = [
    { value: '', label: `Default (${stack.rollout?.fromVersion ? `version ${stack.rollout.fromVersion}, where this rollout started` : 'the previous version'})` },
    ...(versions.data ?? []).filter((v) => v.version !== (stack.rollout?.targetVersion ?? stack.version)).map((v) => ({ value: String(v.version), label: `Version ${v.version} (${dateTime(v.createdAt)})` })),
  ];
  const submit = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      await post(`/edge_stacks/${stack.id}/rollback`, version ? { version: Number(version) } : {});
      notify(`${stack.name}: rolling back`);
      await onDone();
      onClose();
    } catch (err) {
      setError(errorText(err));
      setBusy(false);
    }
  };
  return (
    <Dialog title={`Roll back ${stack.name}`} onClose={onClose}>
      <form onSubmit={submit}>
        <p>Every targeted environment goes back to the chosen version at once.</p>
        <ErrorBanner error={versions.error} onRetry={() => void versions.reload()} />
        <SelectField label="Version" value={version} onChange={setVersion} options={options} />
        <FormError error={error} />
        <div class="form-actions">
          <button type="button" class="btn" onClick={onClose}>
            Cancel
          </button>
          <button type="submit" class="btn btn-danger" disabled={busy} autoFocus>
            {busy ? 'Rolling back…' : 'Roll back'}
          </button>
        </div>
      </form>
    </Dialog>
  );
}

function StatusList({ stack, status, onStatus }: { stack: EdgeStack; status: string; onStatus: (s: string) => void }) {
  const now = useNow(5000);
  const [start, setStart] = useState(0);
  const res = useResource(
    async (signal) => {
      const page = await getPage<StackStatus>(`/edge_stacks/${stack.id}/status`, { status, start, limit: LIMIT }, signal);
      await namesOf(
        page.items.map((s) => s.environmentId),
        signal,
      );
      return page;
    },
    [stack.id, status, start],
    5000,
  );
  const data = res.data;
  return (
    <section class="panel" aria-labelledby="statuses-title">
      <div class="panel-head">
        <h2 id="statuses-title">Environments</h2>
        <div class="toolbar">
          <SelectField
            label="Status"
            value={status}
            onChange={(s) => {
              setStart(0);
              onStatus(s);
            }}
            options={[{ value: '', label: 'Any' }, ...DEPLOY_STATUSES.map((s) => ({ value: s, label: words(s) }))]}
            testid="status-filter"
            class="field-inline"
          />
        </div>
      </div>
      <ErrorBanner error={res.error} onRetry={() => void res.reload()} />
      {res.loading && !data ? <Loading /> : null}
      {data && data.items.length === 0 ? <Empty>{status ? `No environment is at ${words(status)}.` : 'No environment has reported yet.'}</Empty> : null}
      {data && data.items.length > 0 ? (
        <>
          <div class="table-wrap">
            <table class="table" data-testid="stack-statuses">
              <caption class="visually-hidden">Environments of the stack{status ? ` at ${words(status)}` : ''}</caption>
              <thead>
                <tr>
                  <th scope="col">Environment</th>
                  <th scope="col">Status</th>
                  <th scope="col" class="num">
                    Version
                  </th>
                  <th scope="col">Error</th>
                  <th scope="col">Updated</th>
                </tr>
              </thead>
              <tbody>
                {data.items.map((s) => (
                  <tr key={`${s.environmentId}-${s.version}`} data-testid="stack-status-row">
                    <th scope="row">
                      <a href={href(`/environments/${s.environmentId}`)}>{envNames.get(s.environmentId) ?? `#${s.environmentId}`}</a>
                    </th>
                    <td>
                      <Badge value={s.status} />
                    </td>
                    <td class="num">{s.version ?? '–'}</td>
                    <td class="text-bad wrap">{s.error ?? ''}</td>
                    <td title={dateTime(s.updatedAt)}>{s.updatedAt ? ago(s.updatedAt, now) : '–'}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
          <Pager label="Environments of the stack" start={start} limit={LIMIT} total={data.total} onStart={setStart} />
        </>
      ) : null}
    </section>
  );
}

function Versions({ stack, onChanged }: { stack: EdgeStack; onChanged: () => Promise<void> }) {
  const res = useResource((signal) => get<StackVersion[]>(`/edge_stacks/${stack.id}/versions`, undefined, signal), [stack.id, stack.version]);
  const [viewing, setViewing] = useState<number | null>(null);
  const [rollback, setRollback] = useState<number | null>(null);
  const running = stack.rollout?.targetVersion ?? stack.version;
  return (
    <section class="panel" aria-labelledby="versions-title">
      <h2 id="versions-title">Versions</h2>
      <ErrorBanner error={res.error} onRetry={() => void res.reload()} />
      {res.data ? (
        <table class="table table-compact">
          <caption class="visually-hidden">Kept versions, newest first</caption>
          <thead>
            <tr>
              <th scope="col">Version</th>
              <th scope="col">Created</th>
              <th scope="col">
                <span class="visually-hidden">Actions</span>
              </th>
            </tr>
          </thead>
          <tbody>
            {res.data.map((v) => (
              <tr key={v.version}>
                <th scope="row">
                  {v.version}
                  {v.version === running ? <span class="chip">rollout target</span> : null}
                </th>
                <td>{dateTime(v.createdAt)}</td>
                <td class="row-actions">
                  <button type="button" class="btn btn-small" aria-label={`Compose file of version ${v.version}`} onClick={() => setViewing(v.version)}>
                    View
                  </button>
                  {v.version !== running ? (
                    <button type="button" class="btn btn-small" aria-label={`Roll back to version ${v.version}`} onClick={() => setRollback(v.version)}>
                      Roll back to it
                    </button>
                  ) : null}
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      ) : null}
      {viewing !== null ? <VersionDialog stack={stack} version={viewing} onClose={() => setViewing(null)} /> : null}
      {rollback !== null ? <RollbackDialog stack={stack} to={rollback} onClose={() => setRollback(null)} onDone={onChanged} /> : null}
    </section>
  );
}

function VersionDialog({ stack, version, onClose }: { stack: EdgeStack; version: number; onClose: () => void }) {
  const res = useResource((signal) => get<StackVersion>(`/edge_stacks/${stack.id}/versions/${version}`, undefined, signal), [stack.id, version]);
  return (
    <Dialog title={`${stack.name}, version ${version}`} onClose={onClose} wide>
      <ErrorBanner error={res.error} onRetry={() => void res.reload()} />
      {res.data ? (
        <>
          <p class="muted">Created {dateTime(res.data.createdAt)}</p>
          <pre class="codeblock" tabIndex={0} aria-label="Compose file">
            {res.data.compose}
          </pre>
        </>
      ) : (
        <Loading />
      )}
    </Dialog>
  );
}

export function EdgeStackPage({ id, route }: { id: number; route: Route }) {
  const notify = useNotify();
  const groups = useEdgeGroups();
  const res = useResource((signal) => get<EdgeStack>(`/edge_stacks/${id}`, undefined, signal), [id], 3000);
  const [dialog, setDialog] = useState<'version' | 'targets' | 'delete' | null>(null);
  const stack = res.data;
  const status = route.query.get('status') ?? ((stack?.counts?.error ?? 0) > 0 ? 'error' : '');
  const setStatus = (s: string) => navigate(`/edge-stacks/${id}`, { status: s || 'any' }, true);
  const statusParam = status === 'any' ? '' : status;
  if (!stack) {
    return (
      <div class="page">
        <p class="crumbs">
          <a href={href('/edge-stacks')}>Edge stacks</a>
        </p>
        <h1>{res.errorStatus === 404 ? 'Edge stack not found' : `Edge stack ${id}`}</h1>
        <ErrorBanner error={res.error} onRetry={() => void res.reload()} />
        {res.loading ? <Loading /> : null}
      </div>
    );
  }
  const reload = () => res.reload();
  const groupLinks: ComponentChildren = stack.edgeGroupIds.map((g, i) => (
    <span key={g}>
      {i > 0 ? ', ' : ''}
      {groups.data?.find((x) => x.id === g)?.name ?? `#${g}`}
    </span>
  ));
  return (
    <div class="page" data-testid="edge-stack-page">
      <p class="crumbs">
        <a href={href('/edge-stacks')}>Edge stacks</a>
      </p>
      <div class="page-head">
        <h1>{stack.name}</h1>
        <span class="chip">version {stack.version}</span>
        <div class="page-actions">
          <button type="button" class="btn btn-primary" onClick={() => setDialog('version')} data-testid="new-version">
            New version
          </button>
          <button type="button" class="btn" onClick={() => setDialog('targets')}>
            Targets and variables
          </button>
          <button type="button" class="btn btn-danger-quiet" onClick={() => setDialog('delete')}>
            Delete
          </button>
        </div>
      </div>
      <ErrorBanner error={res.error ? `Cannot refresh: ${res.error}` : undefined} onRetry={() => void res.reload()} />
      <Details
        items={[
          ['Edge groups', groupLinks],
          ['Targets', num(stack.targets ?? 0)],
          ['Variables', Object.keys(stack.variables).length ? Object.keys(stack.variables).join(', ') : <span class="muted">none</span>],
          ['Created', dateTime(stack.createdAt)],
          ['On devices', <code>edge_{stack.name}</code>],
        ]}
      />
      <RolloutPanel stack={stack} onChanged={reload} />
      <StatusList stack={stack} status={statusParam as DeployStatus | ''} onStatus={setStatus} />
      <Versions stack={stack} onChanged={reload} />
      {dialog === 'version' ? (
        <NewVersionDialog
          stack={stack}
          onClose={() => setDialog(null)}
          onSaved={(s) => {
            notify(`${s.name}: version ${s.version} is rolling out`);
            setDialog(null);
            void reload();
          }}
        />
      ) : null}
      {dialog === 'targets' ? (
        <TargetsDialog
          stack={stack}
          onClose={() => setDialog(null)}
          onSaved={() => {
            notify(`${stack.name} saved`);
            setDialog(null);
            void reload();
          }}
        />
      ) : null}
      {dialog === 'delete' ? (
        <ConfirmDialog
          title={`Delete edge stack ${stack.name}?`}
          confirmLabel="Delete edge stack"
          danger
          onClose={() => setDialog(null)}
          onConfirm={async () => {
            await del(`/edge_stacks/${stack.id}`);
            notify(`Edge stack ${stack.name} deleted: its environments remove it`);
          }}
          onSuccess={() => navigate('/edge-stacks')}
        >
          <p>The stack and its versions are deleted; every device removes its containers and networks (volumes stay).</p>
        </ConfirmDialog>
      ) : null}
    </div>
  );
}
