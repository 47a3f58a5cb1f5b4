// Edge stacks: compose files, versioned, deployed to edge groups, with their rollouts.

import { useState } from 'preact/hooks';
import { get, getPage } from '../api';
import type { EdgeStack } from '../types';
import { useResource } from '../lib/hooks';
import { num } from '../lib/format';
import { href, navigate } from '../lib/router';
import type { Route } from '../lib/router';
import { Badge, Empty, ErrorBanner, Loading, Pager, useNotify } from '../components/ui';
import { CreateStackDialog, useEdgeGroups } from '../components/stackForms';
import { pool } from '../lib/pool';

const LIMIT = 25;

export function EdgeStacks({ route }: { route: Route }) {
  const notify = useNotify();
  const start = Math.max(0, Number(route.query.get('start')) || 0);
  const groups = useEdgeGroups();
  const list = useResource(
    async (signal) => {
      const page = await getPage<EdgeStack>('/edge_stacks', { start, limit: LIMIT }, signal);
      // The list has no rollout or counts: one call per stack of the page.
      const items = page.items.some((s) => s.counts === undefined)
        ? await pool(page.items, 4, (s) => get<EdgeStack>(`/edge_stacks/${s.id}`, undefined, signal).catch(() => s))
        : page.items;
      return { items, total: page.total };
    },
    [start],
    8000,
  );
  const [creating, setCreating] = useState(false);
  const groupName = (id: number) => groups.data?.find((g) => g.id === id)?.name ?? `#${id}`;
  const data = list.data;
  return (
    <div class="page">
      <div class="page-head">
        <h1>Edge stacks</h1>
        <button type="button" class="btn btn-primary" onClick={() => setCreating(true)} data-testid="create-edge-stack">
          Create edge stack
        </button>
      </div>
      <ErrorBanner error={list.error} onRetry={() => void list.reload()} />
      {list.loading && !data ? <Loading /> : null}
      {data && data.items.length === 0 ? <Empty>No edge stacks yet.</Empty> : null}
      {data && data.items.length > 0 ? (
        <>
          <div class="table-wrap">
            <table class="table" data-testid="edge-stacks-table">
              <caption class="visually-hidden">Edge stacks, with the rollout of their newest version; refreshed every few seconds</caption>
              <thead>
                <tr>
                  <th scope="col">Name</th>
                  <th scope="col" class="num">
                    Version
                  </th>
                  <th scope="col">Rollout</th>
                  <th scope="col" class="num">
                    Targets
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
                  <th scope="col">Edge groups</th>
                </tr>
              </thead>
              <tbody>
                {data.items.map((s) => {
                  const c = s.counts ?? {};
                  const inFlight = (c.acknowledged ?? 0) + (c.imagesPulled ?? 0) + (c.deploying ?? 0);
                  return (
                    <tr key={s.id} data-testid="edge-stack-row" data-name={s.name}>
                      <th scope="row">
                        <a href={href(`/edge-stacks/${s.id}`)}>{s.name}</a>
                      </th>
                      <td class="num">{s.version}</td>
                      <td>{s.rollout ? <Badge value={s.rollout.state} /> : <span class="muted">–</span>}</td>
                      <td class="num">{s.targets !== undefined ? num(s.targets) : '–'}</td>
                      <td class="num">{num(c.running ?? 0)}</td>
                      <td class={(c.error ?? 0) > 0 ? 'num text-bad' : 'num'}>{num(c.error ?? 0)}</td>
                      <td class="num">
                        {num(c.pending ?? 0)}
                        {inFlight ? <span class="muted"> (+{num(inFlight)} deploying)</span> : null}
                      </td>
                      <td>{s.edgeGroupIds.map(groupName).join(', ')}</td>
                    </tr>
                  );
                })}
              </tbody>
            </table>
          </div>
          <Pager label="Edge stacks" start={start} limit={LIMIT} total={data.total} onStart={(s) => navigate('/edge-stacks', { start: s || undefined }, true)} />
        </>
      ) : null}
      {creating ? (
        <CreateStackDialog
          onClose={() => setCreating(false)}
          onCreated={(s) => {
            notify(`Edge stack ${s.name} created: version 1 is rolling out`);
            setCreating(false);
            navigate(`/edge-stacks/${s.id}`);
          }}
        />
      ) : null}
    </div>
  );
}
