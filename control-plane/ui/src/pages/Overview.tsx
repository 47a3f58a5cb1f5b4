// The fleet at a glance: counts from /api/endpoints/summary (one small answer whatever the
// fleet's size), environments that went down recently, rollouts in progress.

import { useState } from 'preact/hooks';
import { get, getPage } from '../api';
import type { EdgeStack, StatusCounts, Summary } from '../types';
import { useCatalog } from '../lib/catalog';
import { useNow, useResource } from '../lib/hooks';
import { ago, dateTime, num, plural } from '../lib/format';
import { href } from '../lib/router';
import { pool } from '../lib/pool';
import { Badge, Empty, ErrorBanner, Loading } from '../components/ui';

const ACTIVE = new Set(['rolling', 'paused', 'rollingBack']);
/** Stacks looked at for rollouts in progress. */
const MAX_STACKS = 200;

/** Edge stacks whose rollout is under way, with their counts. */
export async function activeRollouts(signal: AbortSignal): Promise<{ stacks: EdgeStack[]; total: number }> {
  const page = await getPage<EdgeStack>('/edge_stacks', { start: 0, limit: MAX_STACKS }, signal);
  // A list that carries the rollout saves one call per stack.
  const detailed = page.items.some((s) => s.rollout !== undefined)
    ? page.items
    : await pool(page.items, 6, (s) => get<EdgeStack>(`/edge_stacks/${s.id}`, undefined, signal));
  const candidates = detailed.filter((s) => s.rollout && ACTIVE.has(s.rollout.state));
  const stacks =
    page.items.some((s) => s.rollout !== undefined) && candidates.some((s) => s.counts === undefined)
      ? await pool(candidates, 6, (s) => get<EdgeStack>(`/edge_stacks/${s.id}`, undefined, signal))
      : candidates;
  return { stacks, total: page.total };
}

function Bar({ counts, total }: { counts: StatusCounts; total: number }) {
  if (total === 0) return null;
  const pct = (n: number) => `${(100 * n) / total}%`;
  return (
    <div class="statusbar" aria-hidden="true">
      <span class="seg seg-ok" style={{ width: pct(counts.up) }} />
      <span class="seg seg-bad" style={{ width: pct(counts.down) }} />
      <span class="seg seg-muted" style={{ width: pct(counts.never) }} />
    </div>
  );
}

export function Overview() {
  const cat = useCatalog();
  const now = useNow(5000);
  const summary = useResource((signal) => get<Summary>('/endpoints/summary', undefined, signal), [], 10000);
  const rollouts = useResource((signal) => activeRollouts(signal), [], 15000);
  const [allGroups, setAllGroups] = useState(false);

  const s = summary.data;
  const groupRows = s
    ? Object.entries(s.groups)
        .map(([id, c]) => ({ id: Number(id), c, total: c.up + c.down + c.never }))
        .sort((a, b) => b.c.down - a.c.down || b.total - a.total || a.id - b.id)
    : [];
  const shownGroups = allGroups ? groupRows : groupRows.slice(0, 10);

  return (
    <div class="page">
      <div class="page-head">
        <h1>Overview</h1>
        <span class="muted" aria-live="polite">
          {s ? plural(s.total, 'environment') : ''}
        </span>
      </div>
      <ErrorBanner error={summary.error} onRetry={() => void summary.reload()} />
      {summary.loading && !s ? <Loading /> : null}
      {s ? (
        <>
          <section aria-labelledby="ov-status" class="cards" data-testid="overview-status">
            <h2 id="ov-status" class="visually-hidden">
              Environments by status
            </h2>
            <a class="card" href={href('/environments')}>
              <span class="card-label">Environments</span>
              <span class="card-value" data-testid="count-total">
                {num(s.total)}
              </span>
              <Bar counts={s.status} total={s.total} />
            </a>
            <a class="card card-ok" href={href('/environments', { status: 'up' })}>
              <span class="card-label">Up</span>
              <span class="card-value" data-testid="count-up">
                {num(s.status.up)}
              </span>
            </a>
            <a class="card card-bad" href={href('/environments', { status: 'down' })}>
              <span class="card-label">Down</span>
              <span class="card-value" data-testid="count-down">
                {num(s.status.down)}
              </span>
            </a>
            <a class="card card-muted" href={href('/environments', { status: 'never' })}>
              <span class="card-label">Never connected</span>
              <span class="card-value" data-testid="count-never">
                {num(s.status.never)}
              </span>
            </a>
            <a class="card" href={href('/environments', { mode: 'standard' })}>
              <span class="card-label">Standard (tunnel)</span>
              <span class="card-value">{num(s.mode.standard)}</span>
            </a>
            <a class="card" href={href('/environments', { mode: 'async' })}>
              <span class="card-label">Async</span>
              <span class="card-value">{num(s.mode.async)}</span>
            </a>
          </section>

          <div class="columns">
            <section aria-labelledby="ov-groups" class="panel">
              <h2 id="ov-groups">By group</h2>
              {groupRows.length === 0 ? (
                <Empty>No environments yet.</Empty>
              ) : (
                <>
                  <table class="table">
                    <caption class="visually-hidden">Environments by group and status, most down first</caption>
                    <thead>
                      <tr>
                        <th scope="col">Group</th>
                        <th scope="col" class="num">
                          Up
                        </th>
                        <th scope="col" class="num">
                          Down
                        </th>
                        <th scope="col" class="num">
                          Never
                        </th>
                        <th scope="col" class="num">
                          Total
                        </th>
                      </tr>
                    </thead>
                    <tbody>
                      {shownGroups.map((g) => (
                        <tr key={g.id}>
                          <th scope="row">
                            {g.id === 0 ? (
                              <span class="muted">No group</span>
                            ) : (
                              <a href={href('/environments', { groupId: g.id })}>{cat.groupName(g.id)}</a>
                            )}
                          </th>
                          <td class="num">{num(g.c.up)}</td>
                          <td class={g.c.down > 0 ? 'num text-bad' : 'num'}>{num(g.c.down)}</td>
                          <td class="num">{num(g.c.never)}</td>
                          <td class="num">{num(g.total)}</td>
                        </tr>
                      ))}
                    </tbody>
                  </table>
                  {groupRows.length > 10 ? (
                    <button type="button" class="btn btn-small btn-link" onClick={() => setAllGroups(!allGroups)}>
                      {allGroups ? 'Show the first 10' : `Show all ${num(groupRows.length)} groups`}
                    </button>
                  ) : null}
                </>
              )}
            </section>

            <section aria-labelledby="ov-down" class="panel">
              <h2 id="ov-down">Recently down</h2>
              {s.recentlyDown === undefined ? (
                <Empty>This control plane does not report recently down environments.</Empty>
              ) : s.recentlyDown.length === 0 ? (
                <Empty>No environment went down recently.</Empty>
              ) : (
                <table class="table" data-testid="recently-down">
                  <caption class="visually-hidden">Environments that went down recently, newest first</caption>
                  <thead>
                    <tr>
                      <th scope="col">Environment</th>
                      <th scope="col">Last check-in</th>
                    </tr>
                  </thead>
                  <tbody>
                    {s.recentlyDown.map((e) => (
                      <tr key={e.id}>
                        <th scope="row">
                          <a href={href(`/environments/${e.id}`)}>{e.name}</a>
                        </th>
                        <td title={dateTime(e.lastCheckIn)}>{ago(e.lastCheckIn, now)}</td>
                      </tr>
                    ))}
                  </tbody>
                </table>
              )}
            </section>
          </div>
        </>
      ) : null}

      <section aria-labelledby="ov-rollouts" class="panel">
        <h2 id="ov-rollouts">Rollouts in progress</h2>
        <ErrorBanner error={rollouts.error} onRetry={() => void rollouts.reload()} />
        {rollouts.loading && !rollouts.data ? <Loading /> : null}
        {rollouts.data && rollouts.data.stacks.length === 0 ? (
          <Empty>
            No rollout is under way. <a href={href('/edge-stacks')}>Edge stacks</a>
          </Empty>
        ) : null}
        {rollouts.data && rollouts.data.stacks.length > 0 ? (
          <table class="table" data-testid="rollouts">
            <caption class="visually-hidden">Edge stacks whose rollout is rolling, paused or rolling back</caption>
            <thead>
              <tr>
                <th scope="col">Stack</th>
                <th scope="col">State</th>
                <th scope="col">Version</th>
                <th scope="col" class="num">
                  Batch
                </th>
                <th scope="col" class="num">
                  Released
                </th>
                <th scope="col" class="num">
                  Running
                </th>
                <th scope="col" class="num">
                  Errors
                </th>
                <th scope="col" class="num">
                  Pending
                </th>
              </tr>
            </thead>
            <tbody>
              {rollouts.data.stacks.map((st) => {
                const r = st.rollout!;
                const c = st.counts ?? {};
                return (
                  <tr key={st.id}>
                    <th scope="row">
                      <a href={href(`/edge-stacks/${st.id}`)}>{st.name}</a>
                    </th>
                    <td>
                      <Badge value={r.state} />
                    </td>
                    <td>
                      {r.fromVersion > 0 ? `${r.fromVersion} → ` : ''}
                      {r.targetVersion}
                    </td>
                    <td class="num">{num(r.batch)}</td>
                    <td class="num">
                      {num(r.released)}
                      {st.targets !== undefined ? ` / ${num(st.targets)}` : ''}
                    </td>
                    <td class="num">{num(c.running ?? 0)}</td>
                    <td class={(c.error ?? 0) > 0 ? 'num text-bad' : 'num'}>{num(c.error ?? 0)}</td>
                    <td class="num">{num(c.pending ?? 0)}</td>
                  </tr>
                );
              })}
            </tbody>
          </table>
        ) : null}
        {rollouts.data && rollouts.data.total > MAX_STACKS ? (
          <p class="hint">Looked at the first {MAX_STACKS} of {num(rollouts.data.total)} edge stacks.</p>
        ) : null}
      </section>
    </div>
  );
}
