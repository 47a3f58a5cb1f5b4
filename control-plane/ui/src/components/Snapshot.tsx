// The latest snapshot of an environment's engine, browsable by section. For async
// environments each item offers the commands that apply to it (queued, run by the agent on
// its next command tick).

import type { ComponentChildren } from 'preact';
import { useState } from 'preact/hooks';
import { errorText, get } from '../api';
import type { Environment, NewCommand, SnapContainer, SnapshotView } from '../types';
import { useNow, useResource } from '../lib/hooks';
import { ago, bytes, dateTime, num, shortId } from '../lib/format';
import { navigate } from '../lib/router';
import { Badge, ConfirmDialog, Details, Empty, ErrorBanner, Loading, Pager, TabPanel, Tabs, useNotify } from './ui';

const SECTIONS = ['containers', 'images', 'volumes', 'networks', 'stacks', 'engine'] as const;
type Section = (typeof SECTIONS)[number];
const PAGE = 100;

export type Queue = (cmd: NewCommand, what: string) => Promise<void>;

function containerName(c: SnapContainer): string {
  return c.names[0] ?? shortId(c.id);
}

/** `version`: a change loads the snapshot again (a command finished). */
export function SnapshotPanel({ env, section, onQueue, version = 0 }: { env: Environment; section: string; onQueue?: Queue; version?: number }) {
  const now = useNow(10000);
  const snap = useResource(
    (signal) => get<SnapshotView>(`/endpoints/${env.id}/snapshot`, undefined, signal),
    [env.id, version],
    // An async agent sends snapshots on its interval: look about as often (3 to 15 s).
    env.mode === 'async' ? Math.min(15, Math.max(3, env.snapshotInterval || 15)) * 1000 : 15000,
  );
  const current: Section = (SECTIONS as readonly string[]).includes(section) ? (section as Section) : 'containers';
  const [filter, setFilter] = useState('');
  const [start, setStart] = useState(0);
  const [confirm, setConfirm] = useState<{ cmd: NewCommand; what: string; text: ComponentChildren } | null>(null);
  const notify = useNotify();

  const select = (s: string) => {
    setStart(0);
    setFilter('');
    const q = new URLSearchParams(location.hash.split('?')[1] ?? '');
    q.set('snap', s);
    navigate(`/environments/${env.id}`, Object.fromEntries(q), true);
  };

  if (snap.errorStatus === 404 && !snap.data) {
    return <Empty>No snapshot yet: the agent sends one when it first connects.</Empty>;
  }
  const s = snap.data?.snapshot;
  const counts: Record<Section, number | undefined> = {
    containers: s?.containers.length,
    images: s?.images.length,
    volumes: s?.volumes.length,
    networks: s?.networks.length,
    stacks: s?.stacks.length,
    engine: undefined,
  };
  const label = (x: Section) => `${x[0].toUpperCase()}${x.slice(1)}${counts[x] !== undefined ? ` (${num(counts[x])})` : ''}`;
  const f = filter.trim().toLowerCase();
  const match = (...fields: string[]) => !f || fields.some((x) => x.toLowerCase().includes(f));
  const queue = (cmd: NewCommand, what: string) => (onQueue ? onQueue(cmd, what) : Promise.resolve());
  /** Queued at once (no confirmation): a failure is told in a notification. */
  const direct = (cmd: NewCommand, what: string) => queue(cmd, what).catch((e) => notify(`Cannot queue the ${what}: ${errorText(e)}`, 'error'));
  const ask = (cmd: NewCommand, what: string, text: ComponentChildren) => setConfirm({ cmd, what, text });

  const page = <T,>(items: T[]) => items.slice(start, start + PAGE);
  const pager = (total: number) =>
    total > PAGE ? <Pager label={current} start={start} limit={PAGE} total={total} onStart={setStart} /> : null;

  let body: ComponentChildren = null;
  if (s) {
    switch (current) {
      case 'containers': {
        const items = s.containers.filter((c) => match(containerName(c), c.image, c.state, c.id));
        body = items.length ? (
          <>
            <table class="table" data-testid="snap-containers">
              <caption class="visually-hidden">Containers in the snapshot</caption>
              <thead>
                <tr>
                  <th scope="col">Name</th>
                  <th scope="col">State</th>
                  <th scope="col">Image</th>
                  <th scope="col">Ports</th>
                  <th scope="col">Stack</th>
                  <th scope="col">Created</th>
                  {onQueue ? (
                    <th scope="col">
                      <span class="visually-hidden">Commands</span>
                    </th>
                  ) : null}
                </tr>
              </thead>
              <tbody>
                {page(items).map((c) => {
                  const name = containerName(c);
                  const up = c.state === 'running' || c.state === 'restarting' || c.state === 'paused';
                  return (
                    <tr key={c.id} data-testid="snap-container-row" data-container-name={name} data-state={c.state}>
                      <th scope="row" class="nowrap">
                        {name} <span class="muted id-suffix">{shortId(c.id)}</span>
                      </th>
                      <td>
                        <Badge value={c.state} testid="snap-container-state" />
                      </td>
                      <td class="truncate" title={c.image}>
                        {c.image}
                      </td>
                      <td>{c.ports.join(', ') || <span class="muted">–</span>}</td>
                      <td>{c.labels['com.docker.compose.project'] ?? <span class="muted">–</span>}</td>
                      <td title={dateTime(c.created)}>{ago(c.created, now)}</td>
                      {onQueue ? (
                        <td class="row-actions">
                          {up ? (
                            <>
                              <button type="button" class="btn btn-small" aria-label={`Queue stop of ${name}`} data-testid="queue-stop" onClick={() => void direct({ type: 'containerStop', target: name }, `stop of ${name}`)}>
                                Stop
                              </button>
                              <button type="button" class="btn btn-small" aria-label={`Queue restart of ${name}`} onClick={() => void direct({ type: 'containerRestart', target: name }, `restart of ${name}`)}>
                                Restart
                              </button>
                            </>
                          ) : (
                            <button type="button" class="btn btn-small" aria-label={`Queue start of ${name}`} data-testid="queue-start" onClick={() => void direct({ type: 'containerStart', target: name }, `start of ${name}`)}>
                              Start
                            </button>
                          )}
                          <button
                            type="button"
                            class="btn btn-small btn-danger-quiet"
                            aria-label={`Queue removal of ${name}`}
                            onClick={() => ask({ type: 'containerRemove', target: name, force: true }, `removal of ${name}`, <p>The agent stops and removes the container <strong>{name}</strong> on its next command tick.</p>)}
                          >
                            Remove
                          </button>
                        </td>
                      ) : null}
                    </tr>
                  );
                })}
              </tbody>
            </table>
            {pager(items.length)}
          </>
        ) : (
          <Empty>{f ? 'No container matches.' : 'No containers.'}</Empty>
        );
        break;
      }
      case 'images': {
        const items = s.images.filter((i) => match(i.id, ...i.tags));
        body = items.length ? (
          <>
            <table class="table" data-testid="snap-images">
              <caption class="visually-hidden">Images in the snapshot</caption>
              <thead>
                <tr>
                  <th scope="col">Tags</th>
                  <th scope="col">Id</th>
                  <th scope="col" class="num">
                    Size
                  </th>
                  <th scope="col">Created</th>
                  {onQueue ? (
                    <th scope="col">
                      <span class="visually-hidden">Commands</span>
                    </th>
                  ) : null}
                </tr>
              </thead>
              <tbody>
                {page(items).map((i) => {
                  const target = i.tags[0] ?? i.id;
                  return (
                    <tr key={i.id}>
                      <th scope="row">{i.tags.length ? i.tags.join(', ') : <span class="muted">&lt;none&gt;</span>}</th>
                      <td class="mono">{shortId(i.id)}</td>
                      <td class="num">{bytes(i.size)}</td>
                      <td title={dateTime(i.created)}>{ago(i.created, now)}</td>
                      {onQueue ? (
                        <td class="row-actions">
                          <button
                            type="button"
                            class="btn btn-small btn-danger-quiet"
                            aria-label={`Queue removal of image ${target}`}
                            onClick={() => ask({ type: 'imageRemove', target }, `removal of image ${target}`, <p>The agent removes the image <strong>{target}</strong> (refused by the engine while a container uses it).</p>)}
                          >
                            Remove
                          </button>
                        </td>
                      ) : null}
                    </tr>
                  );
                })}
              </tbody>
            </table>
            {pager(items.length)}
          </>
        ) : (
          <Empty>{f ? 'No image matches.' : 'No images.'}</Empty>
        );
        break;
      }
      case 'volumes': {
        const items = s.volumes.filter((v) => match(v.name, v.driver));
        body = items.length ? (
          <>
            <table class="table" data-testid="snap-volumes">
              <caption class="visually-hidden">Volumes in the snapshot</caption>
              <thead>
                <tr>
                  <th scope="col">Name</th>
                  <th scope="col">Driver</th>
                  <th scope="col">Mount point</th>
                  {onQueue ? (
                    <th scope="col">
                      <span class="visually-hidden">Commands</span>
                    </th>
                  ) : null}
                </tr>
              </thead>
              <tbody>
                {page(items).map((v) => (
                  <tr key={v.name}>
                    <th scope="row" class="truncate" title={v.name}>
                      {v.name}
                    </th>
                    <td>{v.driver}</td>
                    <td class="mono truncate" title={v.mountpoint}>
                      {v.mountpoint}
                    </td>
                    {onQueue ? (
                      <td class="row-actions">
                        <button
                          type="button"
                          class="btn btn-small btn-danger-quiet"
                          aria-label={`Queue removal of volume ${v.name}`}
                          onClick={() => ask({ type: 'volumeRemove', target: v.name }, `removal of volume ${v.name}`, <p>The agent removes the volume <strong>{v.name}</strong> and its data.</p>)}
                        >
                          Remove
                        </button>
                      </td>
                    ) : null}
                  </tr>
                ))}
              </tbody>
            </table>
            {pager(items.length)}
          </>
        ) : (
          <Empty>{f ? 'No volume matches.' : 'No volumes.'}</Empty>
        );
        break;
      }
      case 'networks': {
        const items = s.networks.filter((n) => match(n.name, n.driver, n.id));
        body = items.length ? (
          <>
            <table class="table" data-testid="snap-networks">
              <caption class="visually-hidden">Networks in the snapshot</caption>
              <thead>
                <tr>
                  <th scope="col">Name</th>
                  <th scope="col">Driver</th>
                  <th scope="col">Scope</th>
                  <th scope="col">Id</th>
                </tr>
              </thead>
              <tbody>
                {page(items).map((n) => (
                  <tr key={n.id}>
                    <th scope="row">{n.name}</th>
                    <td>{n.driver}</td>
                    <td>{n.scope}</td>
                    <td class="mono">{shortId(n.id)}</td>
                  </tr>
                ))}
              </tbody>
            </table>
            {pager(items.length)}
          </>
        ) : (
          <Empty>{f ? 'No network matches.' : 'No networks.'}</Empty>
        );
        break;
      }
      case 'stacks': {
        const items = s.stacks.filter((st) => match(st.name, ...st.services));
        body = items.length ? (
          <>
            <table class="table" data-testid="snap-stacks">
              <caption class="visually-hidden">Compose stacks in the snapshot</caption>
              <thead>
                <tr>
                  <th scope="col">Project</th>
                  <th scope="col">Services</th>
                  <th scope="col" class="num">
                    Running
                  </th>
                  {onQueue ? (
                    <th scope="col">
                      <span class="visually-hidden">Commands</span>
                    </th>
                  ) : null}
                </tr>
              </thead>
              <tbody>
                {page(items).map((st) => (
                  <tr key={st.name}>
                    <th scope="row">{st.name}</th>
                    <td>{st.services.join(', ')}</td>
                    <td class={st.running < st.containers ? 'num text-bad' : 'num'}>
                      {st.running} / {st.containers}
                    </td>
                    {onQueue ? (
                      <td class="row-actions">
                        <button
                          type="button"
                          class="btn btn-small btn-danger-quiet"
                          aria-label={`Queue removal of stack ${st.name}`}
                          onClick={() => ask({ type: 'stackRemove', target: st.name }, `removal of stack ${st.name}`, <p>The agent removes the containers and networks of the compose project <strong>{st.name}</strong>.</p>)}
                        >
                          Remove
                        </button>
                      </td>
                    ) : null}
                  </tr>
                ))}
              </tbody>
            </table>
            {pager(items.length)}
          </>
        ) : (
          <Empty>{f ? 'No stack matches.' : 'No compose stacks.'}</Empty>
        );
        break;
      }
      case 'engine':
        body = (
          <Details
            items={[
              ['Engine', `${s.engine.name || '–'} ${s.engine.version}`],
              ['API version', s.engine.apiVersion || '–'],
              ['OS / arch', `${s.engine.os || '–'} / ${s.engine.arch || '–'}`],
              ['Kernel', s.engine.kernelVersion || '–'],
              ['CPUs', num(s.engine.cpus)],
              ['Memory', bytes(s.engine.memoryBytes)],
            ]}
          />
        );
        break;
    }
  }

  return (
    <div data-testid="snapshot">
      <div class="toolbar toolbar-spread">
        <p class="muted">
          {snap.data ? (
            <>
              Taken <span title={dateTime(snap.data.takenAt)}>{ago(snap.data.takenAt, now)}</span>, received{' '}
              <span title={dateTime(snap.data.receivedAt)}>{ago(snap.data.receivedAt, now)}</span>.
            </>
          ) : null}
        </p>
        <button type="button" class="btn btn-small" onClick={() => void snap.reload()}>
          Refresh
        </button>
      </div>
      <ErrorBanner error={snap.errorStatus === 404 ? undefined : snap.error} onRetry={() => void snap.reload()} />
      {snap.loading && !snap.data ? <Loading /> : null}
      {s ? (
        <>
          <Tabs label="Snapshot sections" idPrefix="snap" tabs={SECTIONS.map((x) => ({ id: x, label: label(x) }))} current={current} onSelect={select} />
          <TabPanel idPrefix="snap" id={current}>
            {current !== 'engine' ? (
              <div class="field field-inline">
                <label for="snap-filter">Filter</label>
                <input
                  id="snap-filter"
                  type="search"
                  value={filter}
                  autoComplete="off"
                  spellcheck={false}
                  onInput={(e) => {
                    setFilter(e.currentTarget.value);
                    setStart(0);
                  }}
                />
              </div>
            ) : null}
            {body}
          </TabPanel>
        </>
      ) : null}
      {confirm ? (
        <ConfirmDialog
          title={`Queue the ${confirm.what}?`}
          confirmLabel="Queue command"
          danger
          onClose={() => setConfirm(null)}
          onConfirm={() => queue(confirm.cmd, confirm.what)}
        >
          {confirm.text}
        </ConfirmDialog>
      ) : null}
    </div>
  );
}
