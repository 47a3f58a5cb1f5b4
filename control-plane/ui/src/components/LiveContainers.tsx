// A standard environment's containers, live through its tunnel: the Docker Engine API at
// /api/endpoints/{id}/docker/..., with start, stop, restart, remove, logs and a shell.

import { useState } from 'preact/hooks';
import { del, errorText, get, post } from '../api';
import type { DockerContainer, Environment } from '../types';
import { useBusy, useNow, useResource, useSlow } from '../lib/hooks';
import { ago, shortId } from '../lib/format';
import { Badge, ConfirmDialog, Empty, ErrorBanner, Loading, useNotify } from './ui';
import { LogsPanel } from './Logs';
import { ShellPanel } from './Shell';

const POLL_MS = 5000;

function nameOf(c: DockerContainer): string {
  return (c.Names?.[0] ?? shortId(c.Id)).replace(/^\//, '');
}

function ports(c: DockerContainer): string {
  return (c.Ports ?? [])
    .map((p) => (p.PublicPort ? `${p.IP && p.IP !== '0.0.0.0' && p.IP !== '::' ? `${p.IP}:` : ''}${p.PublicPort}→${p.PrivatePort}/${p.Type}` : `${p.PrivatePort}/${p.Type}`))
    .filter((v, i, all) => all.indexOf(v) === i)
    .join(', ');
}

type Panel = { kind: 'logs' | 'shell'; id: string; name: string } | null;

/** `onTunnel`: the tunnel may have opened (the page reads the environment again). */
export function LiveContainers({ env, onTunnel }: { env: Environment; onTunnel?: () => void }) {
  const notify = useNotify();
  const now = useNow(10000);
  const [tryAnyway, setTryAnyway] = useState(false);
  const reachable = env.status === 'up' || tryAnyway;
  const tunnelOpen = env.tunnel.state === 'open';
  const list = useResource(
    async (signal) => {
      if (!reachable) return undefined;
      const containers = await get<DockerContainer[]>(`/endpoints/${env.id}/docker/containers/json`, { all: 1 }, signal);
      if (!tunnelOpen) onTunnel?.();
      return containers;
    },
    [env.id, reachable],
    reachable ? POLL_MS : 0,
  );
  const slow = useSlow(reachable && list.loading, 700);
  const [panel, setPanel] = useState<Panel>(null);
  const [removing, setRemoving] = useState<DockerContainer | null>(null);
  const [acting, setActing] = useState<string | null>(null);
  const [, run] = useBusy();

  const act = (c: DockerContainer, verb: 'start' | 'stop' | 'restart') =>
    run(async () => {
      const name = nameOf(c);
      setActing(`${c.Id}:${verb}`);
      try {
        await post(`/endpoints/${env.id}/docker/containers/${encodeURIComponent(c.Id)}/${verb}`, undefined, verb === 'start' ? undefined : { t: 10 });
        notify(`${name}: ${verb === 'stop' ? 'stopped' : verb === 'start' ? 'started' : 'restarted'}`);
      } catch (e) {
        notify(`${name}: ${verb} failed: ${errorText(e)}`, 'error');
      } finally {
        setActing(null);
        await list.reload();
      }
    });

  if (!reachable) {
    return (
      <div class="banner banner-info">
        <span>
          The agent is {env.status === 'never' ? 'not connected yet' : 'not checking in'}: live work through the tunnel needs it
          up.
        </span>
        <button type="button" class="btn btn-small" onClick={() => setTryAnyway(true)}>
          Try anyway
        </button>
      </div>
    );
  }

  const data = list.data;
  return (
    <div>
      <div class="toolbar toolbar-spread">
        <p class="muted" role="status" data-testid="live-status">
          {list.loading && !data
            ? slow
              ? 'Opening the tunnel… the first call can take a few seconds.'
              : 'Loading…'
            : data
              ? `${data.length} container${data.length === 1 ? '' : 's'}, refreshed every few seconds through the tunnel (${env.tunnel.state}).`
              : ''}
        </p>
        <button type="button" class="btn btn-small" onClick={() => void list.reload()}>
          Refresh
        </button>
      </div>
      <ErrorBanner error={list.error} onRetry={() => void list.reload()} />
      {list.loading && !data && !slow ? <Loading /> : null}
      {data && data.length === 0 ? <Empty>No containers on this engine.</Empty> : null}
      {data && data.length > 0 ? (
        <div class="table-wrap">
          <table class="table table-live" data-testid="live-containers">
            <caption class="visually-hidden">Containers of the engine, live</caption>
            <thead>
              <tr>
                <th scope="col">Name</th>
                <th scope="col">State</th>
                <th scope="col">Image</th>
                <th scope="col">Status</th>
                <th scope="col">Ports</th>
                <th scope="col">Created</th>
                <th scope="col">
                  <span class="visually-hidden">Actions</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {data.map((c) => {
                const name = nameOf(c);
                const running = c.State === 'running' || c.State === 'restarting' || c.State === 'paused';
                const busy = acting?.startsWith(`${c.Id}:`) ?? false;
                return (
                  <tr key={c.Id} data-testid="container-row" data-container-name={name} data-state={c.State}>
                    <th scope="row" class="nowrap">
                      {name}
                      <span class="muted id-suffix"> {shortId(c.Id)}</span>
                    </th>
                    <td>
                      <Badge value={c.State} testid="container-state" />
                    </td>
                    <td class="truncate" title={c.Image}>
                      {c.Image}
                    </td>
                    <td>{c.Status}</td>
                    <td>{ports(c) || <span class="muted">–</span>}</td>
                    <td class="nowrap">{ago(c.Created, now)}</td>
                    <td class="row-actions">
                      {running ? (
                        <>
                          <button type="button" class="btn btn-small" disabled={busy} aria-label={`Stop ${name}`} onClick={() => void act(c, 'stop')} data-testid="container-stop">
                            {acting === `${c.Id}:stop` ? 'Stopping…' : 'Stop'}
                          </button>
                          <button type="button" class="btn btn-small" disabled={busy} aria-label={`Restart ${name}`} onClick={() => void act(c, 'restart')}>
                            {acting === `${c.Id}:restart` ? 'Restarting…' : 'Restart'}
                          </button>
                        </>
                      ) : (
                        <button type="button" class="btn btn-small" disabled={busy} aria-label={`Start ${name}`} onClick={() => void act(c, 'start')} data-testid="container-start">
                          {acting === `${c.Id}:start` ? 'Starting…' : 'Start'}
                        </button>
                      )}
                      <button type="button" class="btn btn-small" aria-label={`Logs of ${name}`} onClick={() => setPanel({ kind: 'logs', id: c.Id, name })} data-testid="container-logs">
                        Logs
                      </button>
                      <button
                        type="button"
                        class="btn btn-small"
                        disabled={c.State !== 'running'}
                        aria-label={`Shell in ${name}`}
                        onClick={() => setPanel({ kind: 'shell', id: c.Id, name })}
                        data-testid="container-shell"
                      >
                        Shell
                      </button>
                      <button type="button" class="btn btn-small btn-danger-quiet" disabled={busy} aria-label={`Remove ${name}`} onClick={() => setRemoving(c)}>
                        Remove
                      </button>
                    </td>
                  </tr>
                );
              })}
            </tbody>
          </table>
        </div>
      ) : null}

      {panel?.kind === 'logs' ? <LogsPanel key={panel.id} envId={env.id} containerId={panel.id} name={panel.name} onClose={() => setPanel(null)} /> : null}
      {panel?.kind === 'shell' ? <ShellPanel key={panel.id} envId={env.id} containerId={panel.id} name={panel.name} onClose={() => setPanel(null)} /> : null}

      {removing ? (
        <ConfirmDialog
          title={`Remove ${nameOf(removing)}?`}
          confirmLabel="Remove container"
          danger
          onClose={() => setRemoving(null)}
          onConfirm={async () => {
            await del(`/endpoints/${env.id}/docker/containers/${encodeURIComponent(removing.Id)}`, { force: 1 });
            notify(`${nameOf(removing)} removed`);
            if (panel?.id === removing.Id) setPanel(null);
            await list.reload();
          }}
        >
          <p>
            The container <strong>{nameOf(removing)}</strong> is stopped if it runs and removed from the engine. Its anonymous
            volumes stay.
          </p>
        </ConfirmDialog>
      ) : null}
    </div>
  );
}
