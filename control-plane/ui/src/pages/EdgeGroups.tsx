// Edge groups: the sets of environments edge stacks target, static (a list) or dynamic (by
// tags, following tag changes by themselves).

import { useId, useState } from 'preact/hooks';
import { del, errorText, getPage, patch, post } from '../api';
import type { EdgeGroup, Environment } from '../types';
import { useCatalog } from '../lib/catalog';
import { useDebounced, useNow, useResource } from '../lib/hooks';
import { ago, num } from '../lib/format';
import { href, navigate } from '../lib/router';
import type { Route } from '../lib/router';
import { Badge, CheckList, ConfirmDialog, Dialog, Empty, ErrorBanner, FormError, Loading, Pager, SelectField, TextField, useNotify } from '../components/ui';
import { pool } from '../lib/pool';

const LIMIT = 25;

/** Members of each group on the page (one small call per group). */
async function memberCounts(groups: EdgeGroup[], signal: AbortSignal): Promise<Record<number, number>> {
  const counts = await pool(groups, 4, async (g) => {
    try {
      return (await getPage<Environment>(`/edge_groups/${g.id}/environments`, { start: 0, limit: 1 }, signal)).total;
    } catch {
      return -1;
    }
  });
  return Object.fromEntries(groups.map((g, i) => [g.id, counts[i]]));
}

function EnvPicker({ selected, onAdd }: { selected: number[]; onAdd: (e: Environment) => void }) {
  const [q, setQ] = useState('');
  const debounced = useDebounced(q.trim(), 250);
  const id = useId();
  const res = useResource(
    (signal) => (debounced ? getPage<Environment>('/endpoints', { search: debounced, limit: 10 }, signal) : Promise.resolve(undefined)),
    [debounced],
  );
  return (
    <div class="picker">
      <div class="field">
        <label for={id}>Add environments</label>
        <input id={id} type="search" value={q} placeholder="Search by name, Edge ID or id" autoComplete="off" spellcheck={false} onInput={(e) => setQ(e.currentTarget.value)} />
      </div>
      {res.data ? (
        res.data.items.length === 0 ? (
          <p class="hint">No environment matches.</p>
        ) : (
          <ul class="picker-results" aria-label="Matching environments">
            {res.data.items.map((e) => (
              <li key={e.id}>
                <span>
                  {e.name} <span class="muted">#{e.id}</span>
                </span>
                <button type="button" class="btn btn-small" disabled={selected.includes(e.id)} aria-label={`Add ${e.name}`} onClick={() => onAdd(e)}>
                  {selected.includes(e.id) ? 'Added' : 'Add'}
                </button>
              </li>
            ))}
            {res.data.total > res.data.items.length ? <li class="hint">{num(res.data.total - res.data.items.length)} more match: narrow the search.</li> : null}
          </ul>
        )
      ) : null}
    </div>
  );
}

function GroupDialog({ group, onClose, onSaved }: { group?: EdgeGroup; onClose: () => void; onSaved: (g: EdgeGroup) => void }) {
  const cat = useCatalog();
  const [name, setName] = useState(group?.name ?? '');
  const [dynamic, setDynamic] = useState(group?.dynamic ?? false);
  const [tagIds, setTagIds] = useState<number[]>(group?.tagIds ?? []);
  const [match, setMatch] = useState<'any' | 'all'>(group?.match ?? 'any');
  const [envIds, setEnvIds] = useState<number[]>(group?.environmentIds ?? []);
  const [names, setNames] = useState<Record<number, string>>({});
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const kindName = useId();
  const submit = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    const body: Record<string, unknown> = { name: name.trim(), dynamic };
    if (dynamic) {
      body.tagIds = tagIds;
      body.match = match;
    } else {
      body.environmentIds = envIds;
    }
    try {
      const saved = group ? await patch<EdgeGroup>(`/edge_groups/${group.id}`, body) : await post<EdgeGroup>('/edge_groups', body);
      onSaved(saved);
    } catch (err) {
      setError(errorText(err));
      setBusy(false);
    }
  };
  const shown = envIds.slice(0, 100);
  return (
    <Dialog title={group ? `Edit edge group ${group.name}` : 'Create an edge group'} onClose={onClose} wide testid="edge-group-form">
      <form onSubmit={submit}>
        <TextField label="Name" value={name} onInput={setName} required autoFocus maxLength={255} testid="edge-group-name" />
        <fieldset class="field radios">
          <legend>Members</legend>
          <label>
            <input type="radio" name={kindName} checked={!dynamic} onChange={() => setDynamic(false)} />
            Static: a list of environments
          </label>
          <label>
            <input type="radio" name={kindName} checked={dynamic} onChange={() => setDynamic(true)} />
            Dynamic: the environments with tags (their own or their group's), now and later
          </label>
        </fieldset>
        {dynamic ? (
          <>
            <CheckList legend="Tags" items={cat.tags} selected={tagIds} onChange={setTagIds} empty="No tags yet: create some under Tags." />
            <SelectField
              label="Match"
              value={match}
              onChange={setMatch}
              options={[
                { value: 'any', label: 'Any of the tags' },
                { value: 'all', label: 'All of the tags' },
              ]}
            />
          </>
        ) : (
          <>
            <EnvPicker
              selected={envIds}
              onAdd={(e) => {
                setEnvIds((ids) => (ids.includes(e.id) ? ids : [...ids, e.id]));
                setNames((n) => ({ ...n, [e.id]: e.name }));
              }}
            />
            <div class="field">
              <span class="label">
                {envIds.length === 0 ? 'No environments chosen yet.' : `${num(envIds.length)} environment${envIds.length === 1 ? '' : 's'}:`}
              </span>
              {envIds.length ? (
                <ul class="chips chips-removable" aria-label="Chosen environments">
                  {shown.map((id) => (
                    <li key={id} class="chip">
                      {names[id] ?? `#${id}`}
                      <button type="button" class="chip-x" aria-label={`Remove ${names[id] ?? `environment ${id}`}`} onClick={() => setEnvIds((ids) => ids.filter((x) => x !== id))}>
                        ×
                      </button>
                    </li>
                  ))}
                  {envIds.length > shown.length ? <li class="hint">and {num(envIds.length - shown.length)} more</li> : null}
                </ul>
              ) : null}
            </div>
          </>
        )}
        <FormError error={error} />
        <div class="form-actions">
          <button type="button" class="btn" onClick={onClose}>
            Cancel
          </button>
          <button type="submit" class="btn btn-primary" disabled={busy} data-testid="edge-group-submit">
            {busy ? 'Saving…' : group ? 'Save' : 'Create'}
          </button>
        </div>
      </form>
    </Dialog>
  );
}

function MembersDialog({ group, onClose }: { group: EdgeGroup; onClose: () => void }) {
  const now = useNow(5000);
  const [start, setStart] = useState(0);
  const res = useResource((signal) => getPage<Environment>(`/edge_groups/${group.id}/environments`, { start, limit: LIMIT }, signal), [group.id, start], 10000);
  return (
    <Dialog title={`Members of ${group.name}`} onClose={onClose} wide testid="edge-group-members">
      <ErrorBanner error={res.error} onRetry={() => void res.reload()} />
      {res.loading && !res.data ? <Loading /> : null}
      {res.data && res.data.items.length === 0 ? <Empty>No environment is in this group now.</Empty> : null}
      {res.data && res.data.items.length > 0 ? (
        <>
          <table class="table">
            <caption class="visually-hidden">Current members</caption>
            <thead>
              <tr>
                <th scope="col">Environment</th>
                <th scope="col">Status</th>
                <th scope="col">Last check-in</th>
              </tr>
            </thead>
            <tbody>
              {res.data.items.map((e) => (
                <tr key={e.id}>
                  <th scope="row">
                    <a href={href(`/environments/${e.id}`)} onClick={onClose}>
                      {e.name}
                    </a>
                  </th>
                  <td>
                    <Badge value={e.status} />
                  </td>
                  <td>{ago(e.lastCheckIn, now)}</td>
                </tr>
              ))}
            </tbody>
          </table>
          <Pager label="Members" start={start} limit={LIMIT} total={res.data.total} onStart={setStart} />
        </>
      ) : null}
    </Dialog>
  );
}

export function EdgeGroups({ route }: { route: Route }) {
  const cat = useCatalog();
  const notify = useNotify();
  const start = Math.max(0, Number(route.query.get('start')) || 0);
  const list = useResource((signal) => getPage<EdgeGroup>('/edge_groups', { start, limit: LIMIT }, signal), [start]);
  const counts = useResource((signal) => (list.data ? memberCounts(list.data.items, signal) : Promise.resolve({} as Record<number, number>)), [list.data]);
  const [dialog, setDialog] = useState<{ kind: 'edit'; group?: EdgeGroup } | { kind: 'members' | 'delete'; group: EdgeGroup } | null>(null);
  const data = list.data;
  return (
    <div class="page">
      <div class="page-head">
        <h1>Edge groups</h1>
        <button type="button" class="btn btn-primary" onClick={() => setDialog({ kind: 'edit' })} data-testid="create-edge-group">
          Create edge group
        </button>
      </div>
      <p class="muted page-intro">Edge stacks are deployed to edge groups.</p>
      <ErrorBanner error={list.error} onRetry={() => void list.reload()} />
      {list.loading && !data ? <Loading /> : null}
      {data && data.items.length === 0 ? <Empty>No edge groups yet.</Empty> : null}
      {data && data.items.length > 0 ? (
        <>
          <table class="table" data-testid="edge-groups-table">
            <caption class="visually-hidden">Edge groups</caption>
            <thead>
              <tr>
                <th scope="col">Name</th>
                <th scope="col">Kind</th>
                <th scope="col">Selects</th>
                <th scope="col" class="num">
                  Members
                </th>
                <th scope="col">
                  <span class="visually-hidden">Actions</span>
                </th>
              </tr>
            </thead>
            <tbody>
              {data.items.map((g) => {
                const n = counts.data?.[g.id];
                return (
                  <tr key={g.id} data-testid="edge-group-row" data-name={g.name}>
                    <th scope="row">
                      {g.name} <span class="muted id-suffix">#{g.id}</span>
                    </th>
                    <td>{g.dynamic ? 'dynamic' : 'static'}</td>
                    <td>
                      {g.dynamic ? (
                        <>
                          {g.match === 'all' ? 'all of ' : 'any of '}
                          <span class="chips">
                            {g.tagIds.map((t) => (
                              <span key={t} class="chip">
                                {cat.tagName(t)}
                              </span>
                            ))}
                          </span>
                        </>
                      ) : (
                        `${num(g.environmentIds.length)} listed`
                      )}
                    </td>
                    <td class="num">{n === undefined ? '…' : n < 0 ? '?' : num(n)}</td>
                    <td class="row-actions">
                      <button type="button" class="btn btn-small" aria-label={`Members of ${g.name}`} onClick={() => setDialog({ kind: 'members', group: g })}>
                        Members
                      </button>
                      <button type="button" class="btn btn-small" aria-label={`Edit ${g.name}`} onClick={() => setDialog({ kind: 'edit', group: g })}>
                        Edit
                      </button>
                      <button type="button" class="btn btn-small btn-danger-quiet" aria-label={`Delete ${g.name}`} onClick={() => setDialog({ kind: 'delete', group: g })}>
                        Delete
                      </button>
                    </td>
                  </tr>
                );
              })}
            </tbody>
          </table>
          <Pager label="Edge groups" start={start} limit={LIMIT} total={data.total} onStart={(s) => navigate('/edge-groups', { start: s || undefined }, true)} />
        </>
      ) : null}
      {dialog?.kind === 'edit' ? (
        <GroupDialog
          group={dialog.group}
          onClose={() => setDialog(null)}
          onSaved={(g) => {
            notify(`Edge group ${g.name} saved`);
            setDialog(null);
            void list.reload();
          }}
        />
      ) : null}
      {dialog?.kind === 'members' ? <MembersDialog group={dialog.group} onClose={() => setDialog(null)} /> : null}
      {dialog?.kind === 'delete' ? (
        <ConfirmDialog
          title={`Delete edge group ${dialog.group.name}?`}
          confirmLabel="Delete edge group"
          danger
          onClose={() => setDialog(null)}
          onConfirm={async () => {
            await del(`/edge_groups/${dialog.group.id}`);
            notify(`Edge group ${dialog.group.name} deleted`);
            await list.reload();
          }}
        >
          <p>The control plane refuses while an edge stack targets it.</p>
        </ConfirmDialog>
      ) : null}
    </div>
  );
}
