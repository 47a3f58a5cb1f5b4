// Groups (with the tags their environments inherit) and tags.

import { useState } from 'preact/hooks';
import { del, errorText, get, patch, post } from '../api';
import type { Group, Summary, Tag } from '../types';
import { useCatalog } from '../lib/catalog';
import { useResource } from '../lib/hooks';
import { num } from '../lib/format';
import { href } from '../lib/router';
import { CheckList, ConfirmDialog, Dialog, Empty, ErrorBanner, FormError, TextField, useNotify } from '../components/ui';

type Kind = 'groups' | 'tags';
const NOUN: Record<Kind, string> = { groups: 'group', tags: 'tag' };

function NamedDialog({ kind, item, onClose, onSaved }: { kind: Kind; item?: Group; onClose: () => void; onSaved: (name: string) => void }) {
  const cat = useCatalog();
  const [name, setName] = useState(item?.name ?? '');
  const [tagIds, setTagIds] = useState<number[]>(item?.tagIds ?? []);
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const submit = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      const body: Record<string, unknown> = { name: name.trim() };
      if (kind === 'groups') body.tagIds = tagIds;
      if (item) await patch(`/${kind}/${item.id}`, body);
      else await post(`/${kind}`, body);
      onSaved(name.trim());
    } catch (err) {
      setError(errorText(err));
      setBusy(false);
    }
  };
  return (
    <Dialog title={item ? `Edit ${NOUN[kind]} ${item.name}` : `Create a ${NOUN[kind]}`} onClose={onClose} testid={`${NOUN[kind]}-form`}>
      <form onSubmit={submit}>
        <TextField label="Name" value={name} onInput={setName} required autoFocus maxLength={255} testid="named-name" />
        {kind === 'groups' ? (
          <CheckList
            legend="Tags of the group"
            items={cat.tags}
            selected={tagIds}
            onChange={setTagIds}
            hint="Its environments count as having these tags (dynamic edge groups select by them)."
          />
        ) : null}
        <FormError error={error} />
        <div class="form-actions">
          <button type="button" class="btn" onClick={onClose}>
            Cancel
          </button>
          <button type="submit" class="btn btn-primary" disabled={busy} data-testid="named-submit">
            {busy ? 'Saving…' : item ? 'Save' : 'Create'}
          </button>
        </div>
      </form>
    </Dialog>
  );
}

function NamedPage({ kind }: { kind: Kind }) {
  const cat = useCatalog();
  const notify = useNotify();
  const list = useResource((signal) => get<(Group | Tag)[]>(`/${kind}`, undefined, signal), [kind]);
  const summary = useResource(
    (signal) => (kind === 'groups' ? get<Summary>('/endpoints/summary', undefined, signal) : Promise.resolve(undefined)),
    [kind],
    kind === 'groups' ? 15000 : 0,
  );
  const [editing, setEditing] = useState<Group | 'new' | null>(null);
  const [deleting, setDeleting] = useState<Group | null>(null);
  const items = [...(list.data ?? [])].sort((a, b) => a.name.localeCompare(b.name));
  const changed = async () => {
    await list.reload();
    await cat.reload();
  };
  const title = kind === 'groups' ? 'Groups' : 'Tags';
  return (
    <div class="page">
      <div class="page-head">
        <h1>{title}</h1>
        <button type="button" class="btn btn-primary" onClick={() => setEditing('new')} data-testid={`create-${NOUN[kind]}`}>
          Create {NOUN[kind]}
        </button>
      </div>
      <p class="muted page-intro">
        {kind === 'groups'
          ? 'Every environment is in at most one group. A group may carry tags: its environments count as having them.'
          : 'Environments (and groups) carry any number of tags; lists filter by them and dynamic edge groups select by them.'}
      </p>
      <ErrorBanner error={list.error} onRetry={() => void list.reload()} />
      {list.data && items.length === 0 ? <Empty>No {kind} yet.</Empty> : null}
      {items.length > 0 ? (
        <table class="table" data-testid={`${kind}-table`}>
          <caption class="visually-hidden">{title}</caption>
          <thead>
            <tr>
              <th scope="col">Name</th>
              {kind === 'groups' ? <th scope="col">Tags</th> : null}
              {kind === 'groups' ? (
                <th scope="col" class="num">
                  Environments (up / down / never)
                </th>
              ) : null}
              <th scope="col">
                <span class="visually-hidden">Actions</span>
              </th>
            </tr>
          </thead>
          <tbody>
            {items.map((it) => {
              const c = summary.data?.groups[String(it.id)];
              const g = it as Group;
              return (
                <tr key={it.id} data-testid={`${NOUN[kind]}-row`} data-name={it.name}>
                  <th scope="row">
                    <a href={href('/environments', kind === 'groups' ? { groupId: it.id } : { tagId: it.id })}>{it.name}</a>
                    <span class="muted id-suffix"> #{it.id}</span>
                  </th>
                  {kind === 'groups' ? (
                    <td>
                      {g.tagIds?.length ? (
                        <span class="chips">
                          {g.tagIds.map((t) => (
                            <span key={t} class="chip">
                              {cat.tagName(t)}
                            </span>
                          ))}
                        </span>
                      ) : (
                        <span class="muted">–</span>
                      )}
                    </td>
                  ) : null}
                  {kind === 'groups' ? (
                    <td class="num">{c ? `${num(c.up + c.down + c.never)} (${num(c.up)} / ${num(c.down)} / ${num(c.never)})` : '0'}</td>
                  ) : null}
                  <td class="row-actions">
                    <button type="button" class="btn btn-small" aria-label={`Edit ${it.name}`} onClick={() => setEditing(g)}>
                      Edit
                    </button>
                    <button type="button" class="btn btn-small btn-danger-quiet" aria-label={`Delete ${it.name}`} onClick={() => setDeleting(g)}>
                      Delete
                    </button>
                  </td>
                </tr>
              );
            })}
          </tbody>
        </table>
      ) : null}
      {editing ? (
        <NamedDialog
          kind={kind}
          item={editing === 'new' ? undefined : editing}
          onClose={() => setEditing(null)}
          onSaved={(name) => {
            notify(`${NOUN[kind]} ${name} saved`);
            setEditing(null);
            void changed();
          }}
        />
      ) : null}
      {deleting ? (
        <ConfirmDialog
          title={`Delete ${NOUN[kind]} ${deleting.name}?`}
          confirmLabel={`Delete ${NOUN[kind]}`}
          danger
          onClose={() => setDeleting(null)}
          onConfirm={async () => {
            await del(`/${kind}/${deleting.id}`);
            notify(`${NOUN[kind]} ${deleting.name} deleted`);
            await changed();
          }}
        >
          <p>
            Only an unused {NOUN[kind]} can be deleted: the control plane refuses while environments
            {kind === 'tags' ? ', groups or dynamic edge groups' : ''} use it.
          </p>
        </ConfirmDialog>
      ) : null}
    </div>
  );
}

export function Groups() {
  return <NamedPage kind="groups" />;
}

export function Tags() {
  return <NamedPage kind="tags" />;
}
