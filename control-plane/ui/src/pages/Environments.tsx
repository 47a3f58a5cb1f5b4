// Environments: one server-side page at a time (search, filters, paging are the list API's),
// refreshed every few seconds while the tab is visible, so statuses change in place.

import { useEffect, useId, useRef, useState } from 'preact/hooks';
import { getPage } from '../api';
import type { Environment } from '../types';
import { useCatalog } from '../lib/catalog';
import { useDebounced, useNow, useResource } from '../lib/hooks';
import { ago, dateTime, num } from '../lib/format';
import { href, navigate } from '../lib/router';
import type { Route } from '../lib/router';
import { Badge, Empty, ErrorBanner, Loading, PAGE_SIZES, Pager } from '../components/ui';
import { EnvDialogs } from '../components/envDialogs';
import type { EnvDialog } from '../components/envDialogs';

const POLL_MS = 4000;

interface Filters {
  search: string;
  status: string;
  mode: string;
  groupId: string;
  tagId: string;
  start: number;
  limit: number;
}

function filtersOf(q: URLSearchParams): Filters {
  const limit = Number(q.get('limit'));
  return {
    search: q.get('search') ?? '',
    status: q.get('status') ?? '',
    mode: q.get('mode') ?? '',
    groupId: q.get('groupId') ?? '',
    tagId: q.get('tagId') ?? '',
    start: Math.max(0, Number(q.get('start')) || 0),
    limit: PAGE_SIZES.includes(limit) ? limit : 25,
  };
}

function go(f: Filters) {
  navigate(
    '/environments',
    {
      search: f.search,
      status: f.status,
      mode: f.mode,
      groupId: f.groupId,
      tagId: f.tagId,
      start: f.start || undefined,
      limit: f.limit === 25 ? undefined : f.limit,
    },
    true,
  );
}

export function Environments({ route }: { route: Route }) {
  const cat = useCatalog();
  const now = useNow(5000);
  const f = filtersOf(route.query);
  const [search, setSearch] = useState(f.search);
  const debounced = useDebounced(search, 300);
  const [dialog, setDialog] = useState<EnvDialog>(null);
  const ids = { search: useId(), status: useId(), mode: useId(), group: useId(), tag: useId() };

  // The search box drives the route once typing pauses (and goes back to the first page).
  useEffect(() => {
    if (debounced.trim() !== f.search) go({ ...f, search: debounced.trim(), start: 0 });
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [debounced]);
  // ...and follows it when the route changes otherwise (links, back).
  const lastRouteSearch = useRef(f.search);
  useEffect(() => {
    if (f.search !== lastRouteSearch.current) {
      lastRouteSearch.current = f.search;
      if (f.search !== search.trim()) setSearch(f.search);
    }
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [f.search]);

  const list = useResource(
    (signal) =>
      getPage<Environment>(
        '/endpoints',
        {
          start: f.start,
          limit: f.limit,
          search: f.search,
          status: f.status,
          mode: f.mode,
          groupId: f.groupId,
          tagIds: f.tagId,
        },
        signal,
      ),
    [f.start, f.limit, f.search, f.status, f.mode, f.groupId, f.tagId],
    POLL_MS,
  );

  // Status changes on the page shown are announced (the list refreshes by itself).
  const seen = useRef(new Map<number, string>());
  const [announce, setAnnounce] = useState('');
  useEffect(() => {
    if (!list.data) return;
    const changes: string[] = [];
    const next = new Map<number, string>();
    for (const e of list.data.items) {
      const before = seen.current.get(e.id);
      if (before !== undefined && before !== e.status) changes.push(`${e.name} is now ${e.status}`);
      next.set(e.id, e.status);
    }
    seen.current = next;
    if (changes.length) setAnnounce(changes.slice(0, 5).join('. ') + (changes.length > 5 ? `, and ${changes.length - 5} more` : ''));
  }, [list.data]);

  // A page past the end (after deletions or a narrower filter): back to the last one.
  useEffect(() => {
    const d = list.data;
    if (d && d.items.length === 0 && d.total > 0 && f.start >= d.total) {
      go({ ...f, start: Math.floor((d.total - 1) / f.limit) * f.limit });
    }
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [list.data]);

  const filtered = f.search || f.status || f.mode || f.groupId || f.tagId;
  const data = list.data;

  return (
    <div class="page">
      <div class="page-head">
        <h1>Environments</h1>
        <button type="button" class="btn btn-primary" onClick={() => setDialog({ kind: 'create' })} data-testid="create-environment">
          Create environment
        </button>
      </div>

      <form class="filters" role="search" aria-label="Filter environments" onSubmit={(e) => e.preventDefault()}>
        <div class="field field-grow">
          <label for={ids.search}>Search</label>
          <input
            id={ids.search}
            type="search"
            value={search}
            placeholder="Name, Edge ID or id"
            autoComplete="off"
            spellcheck={false}
            data-testid="env-search"
            onInput={(e) => setSearch(e.currentTarget.value)}
          />
        </div>
        <div class="field">
          <label for={ids.status}>Status</label>
          <select id={ids.status} value={f.status} onChange={(e) => go({ ...f, status: e.currentTarget.value, start: 0 })} data-testid="filter-status">
            <option value="">Any</option>
            <option value="up">Up</option>
            <option value="down">Down</option>
            <option value="never">Never connected</option>
            <option value="down,never">Not up</option>
          </select>
        </div>
        <div class="field">
          <label for={ids.mode}>Mode</label>
          <select id={ids.mode} value={f.mode} onChange={(e) => go({ ...f, mode: e.currentTarget.value, start: 0 })} data-testid="filter-mode">
            <option value="">Any</option>
            <option value="standard">Standard</option>
            <option value="async">Async</option>
          </select>
        </div>
        <div class="field">
          <label for={ids.group}>Group</label>
          <select id={ids.group} value={f.groupId} onChange={(e) => go({ ...f, groupId: e.currentTarget.value, start: 0 })} data-testid="filter-group">
            <option value="">Any</option>
            {cat.groups.map((g) => (
              <option key={g.id} value={String(g.id)}>
                {g.name}
              </option>
            ))}
            {f.groupId && !cat.groups.some((g) => String(g.id) === f.groupId) ? <option value={f.groupId}>group {f.groupId}</option> : null}
          </select>
        </div>
        <div class="field">
          <label for={ids.tag}>Tag</label>
          <select id={ids.tag} value={f.tagId} onChange={(e) => go({ ...f, tagId: e.currentTarget.value, start: 0 })} data-testid="filter-tag">
            <option value="">Any</option>
            {cat.tags.map((t) => (
              <option key={t.id} value={String(t.id)}>
                {t.name}
              </option>
            ))}
            {f.tagId && !cat.tags.some((t) => String(t.id) === f.tagId) ? <option value={f.tagId}>tag {f.tagId}</option> : null}
          </select>
        </div>
        {filtered ? (
          <button
            type="button"
            class="btn btn-small filters-clear"
            onClick={() => {
              setSearch('');
              go({ search: '', status: '', mode: '', groupId: '', tagId: '', start: 0, limit: f.limit });
            }}
          >
            Clear filters
          </button>
        ) : null}
      </form>

      <p class="visually-hidden" aria-live="polite" data-testid="env-announce">
        {announce}
      </p>
      <ErrorBanner error={list.error} onRetry={() => void list.reload()} />
      {list.loading && !data ? <Loading /> : null}

      {data ? (
        <>
          {data.items.length === 0 ? (
            <Empty>
              {filtered ? 'No environment matches these filters.' : 'No environments yet: create one and run its install command on a host.'}
            </Empty>
          ) : (
            <div class="table-wrap">
              <table class="table" data-testid="env-table" aria-busy={list.loading}>
                <caption class="visually-hidden">
                  Environments {num(f.start + 1)} to {num(f.start + data.items.length)} of {num(data.total)}; the list refreshes every few seconds
                </caption>
                <thead>
                  <tr>
                    <th scope="col">Name</th>
                    <th scope="col">Status</th>
                    <th scope="col">Mode</th>
                    <th scope="col">Group</th>
                    <th scope="col">Tags</th>
                    <th scope="col">Last check-in</th>
                    <th scope="col">Tunnel</th>
                    <th scope="col">
                      <span class="visually-hidden">Actions</span>
                    </th>
                  </tr>
                </thead>
                <tbody>
                  {data.items.map((e) => (
                    <tr key={e.id} data-testid="env-row" data-env-id={e.id} data-env-name={e.name} data-status={e.status}>
                      <th scope="row">
                        <a href={href(`/environments/${e.id}`)} data-testid="env-link">
                          {e.name}
                        </a>
                        <span class="muted id-suffix"> #{e.id}</span>
                      </th>
                      <td>
                        <Badge value={e.status} testid="env-status" />
                      </td>
                      <td>{e.mode}</td>
                      <td>{cat.groupName(e.groupId) || <span class="muted">–</span>}</td>
                      <td>
                        {e.tagIds.length ? (
                          <span class="chips">
                            {e.tagIds.map((t) => (
                              <span key={t} class="chip">
                                {cat.tagName(t)}
                              </span>
                            ))}
                          </span>
                        ) : (
                          <span class="muted">–</span>
                        )}
                      </td>
                      <td title={dateTime(e.lastCheckIn)}>{ago(e.lastCheckIn, now)}</td>
                      <td>{e.mode === 'standard' ? <Badge value={e.tunnel.state} /> : <span class="muted">n/a</span>}</td>
                      <td class="row-actions">
                        <button type="button" class="btn btn-small" aria-label={`Install command of ${e.name}`} onClick={() => setDialog({ kind: 'install', env: e })}>
                          Install
                        </button>
                        <button type="button" class="btn btn-small" aria-label={`Reset the association of ${e.name}`} onClick={() => setDialog({ kind: 'reset', env: e })}>
                          Reset
                        </button>
                        <button type="button" class="btn btn-small btn-danger-quiet" aria-label={`Delete ${e.name}`} onClick={() => setDialog({ kind: 'delete', env: e })}>
                          Delete
                        </button>
                      </td>
                    </tr>
                  ))}
                </tbody>
              </table>
            </div>
          )}
          <Pager
            label="Environments"
            start={f.start}
            limit={f.limit}
            total={data.total}
            onStart={(start) => go({ ...f, start })}
            onLimit={(limit) => go({ ...f, limit, start: 0 })}
          />
        </>
      ) : null}

      <EnvDialogs dialog={dialog} setDialog={setDialog} onChanged={() => void list.reload()} />
    </div>
  );
}
