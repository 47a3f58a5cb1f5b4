// Forms of edge stacks: create, a new version, targets and variables, the rollout settings.

import { useEffect, useState } from 'preact/hooks';
import { errorText, get, getAll, post, put } from '../api';
import type { EdgeGroup, EdgeStack, RolloutConfig, StackVersion } from '../types';
import { useResource } from '../lib/hooks';
import { CheckList, Checkbox, Dialog, ErrorBanner, FormError, NumberField, SelectField, TextAreaField, TextField } from './ui';

export function useEdgeGroups() {
  return useResource(() => getAll<EdgeGroup>('/edge_groups'), []);
}

/** `KEY=value` lines <-> an object. */
export function parseVariables(text: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (!line || line.startsWith('#')) continue;
    const eq = line.indexOf('=');
    if (eq <= 0) throw new Error(`variables: "${line}" is not NAME=value`);
    out[line.slice(0, eq).trim()] = line.slice(eq + 1);
  }
  return out;
}

export function formatVariables(v: Record<string, string> | undefined): string {
  return Object.entries(v ?? {})
    .map(([k, x]) => `${k}=${x}`)
    .join('\n');
}

export interface RolloutDraft {
  staged: boolean;
  batchSize: number | null;
  batchGrowth: 'fixed' | 'double';
  waitSecs: number | null;
  batchTimeoutSecs: number | null;
  failureThreshold: number | null;
  onFailure: 'pause' | 'rollback' | 'continue';
}

export function draftOf(c?: RolloutConfig): RolloutDraft {
  return {
    staged: !!c?.batchSize,
    batchSize: c?.batchSize ?? 10,
    batchGrowth: c?.batchGrowth ?? 'fixed',
    waitSecs: c?.waitSecs ?? 60,
    batchTimeoutSecs: c?.batchTimeoutSecs ?? 600,
    failureThreshold: c?.failureThreshold ?? 0.05,
    onFailure: c?.onFailure ?? 'pause',
  };
}

/** The rollout body of a draft: all at once (no batch size) or staged. */
export function rolloutOf(d: RolloutDraft): RolloutConfig {
  const c: RolloutConfig = {
    batchGrowth: d.batchGrowth,
    onFailure: d.onFailure,
    failureThreshold: d.failureThreshold ?? 0,
    batchTimeoutSecs: d.batchTimeoutSecs ?? 600,
    waitSecs: d.waitSecs ?? 0,
  };
  if (d.staged && d.batchSize) c.batchSize = d.batchSize;
  return c;
}

export function RolloutFields({ value, onChange }: { value: RolloutDraft; onChange: (d: RolloutDraft) => void }) {
  const set = <K extends keyof RolloutDraft>(k: K, v: RolloutDraft[K]) => onChange({ ...value, [k]: v });
  return (
    <fieldset class="field rollout-fields">
      <legend>Rollout</legend>
      <Checkbox label="Staged: release the version in batches" checked={value.staged} onChange={(v) => set('staged', v)} testid="rollout-staged" />
      {value.staged ? (
        <div class="form-row">
          <NumberField label="First batch (environments)" value={value.batchSize} onInput={(v) => set('batchSize', v)} min={1} required />
          <SelectField
            label="Next batches"
            value={value.batchGrowth}
            onChange={(v) => set('batchGrowth', v)}
            options={[
              { value: 'fixed', label: 'The same size' },
              { value: 'double', label: 'Twice the last' },
            ]}
          />
          <NumberField label="Wait between batches (s)" value={value.waitSecs} onInput={(v) => set('waitSecs', v)} min={0} max={86400} />
          <NumberField label="Batch timeout (s)" value={value.batchTimeoutSecs} onInput={(v) => set('batchTimeoutSecs', v)} min={1} max={86400} hint="Silent environments count as not yet after it." />
        </div>
      ) : (
        <p class="hint">All targeted environments get the version at once.</p>
      )}
      <div class="form-row">
        <NumberField
          label="Failures tolerated"
          value={value.failureThreshold}
          onInput={(v) => set('failureThreshold', v)}
          min={0}
          step="any"
          hint="Below 1: a share of the released environments (0.05 = 5 %); from 1: a count."
        />
        <SelectField
          label="Past it"
          value={value.onFailure}
          onChange={(v) => set('onFailure', v)}
          options={[
            { value: 'pause', label: 'Pause the rollout' },
            { value: 'rollback', label: 'Roll back' },
            { value: 'continue', label: 'Continue' },
          ]}
        />
      </div>
    </fieldset>
  );
}

const NAME_PATTERN = '[a-z0-9][a-z0-9_\\-]{0,57}';

export function CreateStackDialog({ onClose, onCreated }: { onClose: () => void; onCreated: (s: EdgeStack) => void }) {
  const groups = useEdgeGroups();
  const [name, setName] = useState('');
  const [groupIds, setGroupIds] = useState<number[]>([]);
  const [compose, setCompose] = useState('services:\n  app:\n    image: \n    restart: unless-stopped\n');
  const [variables, setVariables] = useState('');
  const [rollout, setRollout] = useState<RolloutDraft>(draftOf());
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const submit = async (e: Event) => {
    e.preventDefault();
    setError(null);
    try {
      const body = { name: name.trim(), compose, edgeGroupIds: groupIds, variables: parseVariables(variables), rollout: rolloutOf(rollout) };
      setBusy(true);
      onCreated(await post<EdgeStack>('/edge_stacks', body));
    } catch (err) {
      setError(errorText(err));
      setBusy(false);
    }
  };
  return (
    <Dialog title="Create an edge stack" onClose={onClose} wide testid="stack-form">
      <form onSubmit={submit}>
        <TextField
          label="Name"
          value={name}
          onInput={setName}
          required
          autoFocus
          pattern={NAME_PATTERN}
          hint="a-z, 0-9, - and _ (up to 58); the compose project on each device is edge_<name>. It cannot change later."
          testid="stack-name"
        />
        <ErrorBanner error={groups.error} onRetry={() => void groups.reload()} />
        <CheckList legend="Edge groups" items={groups.data ?? []} selected={groupIds} onChange={setGroupIds} empty="No edge groups yet: create one first." />
        <TextAreaField label="Compose file" value={compose} onInput={setCompose} rows={14} code required testid="stack-compose" hint="${EDGE_ENV_NAME}, ${EDGE_ENV_ID}, ${EDGE_GROUP_NAME}, ${EDGE_TAG_<name>} and the variables below are substituted per environment." />
        <TextAreaField label="Variables (NAME=value, one per line)" value={variables} onInput={setVariables} rows={3} code />
        <RolloutFields value={rollout} onChange={setRollout} />
        <FormError error={error} />
        <div class="form-actions">
          <button type="button" class="btn" onClick={onClose}>
            Cancel
          </button>
          <button type="submit" class="btn btn-primary" disabled={busy} data-testid="stack-submit">
            {busy ? 'Creating…' : 'Create and deploy'}
          </button>
        </div>
      </form>
    </Dialog>
  );
}

/** A new version: the compose file of the newest one, edited, with how it goes out. */
export function NewVersionDialog({ stack, onClose, onSaved }: { stack: EdgeStack; onClose: () => void; onSaved: (s: EdgeStack) => void }) {
  const current = useResource((signal) => get<StackVersion>(`/edge_stacks/${stack.id}/versions/${stack.version}`, undefined, signal), [stack.id, stack.version]);
  const [compose, setCompose] = useState<string | null>(null);
  const [custom, setCustom] = useState(false);
  const [rollout, setRollout] = useState<RolloutDraft>(draftOf(stack.rollout?.config));
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  useEffect(() => {
    if (compose === null && current.data?.compose !== undefined) setCompose(current.data.compose);
  }, [current.data, compose]);
  const submit = async (e: Event) => {
    e.preventDefault();
    if (compose === null) return;
    setBusy(true);
    setError(null);
    try {
      const body: Record<string, unknown> = { compose, baseVersion: stack.version };
      if (custom) body.rollout = rolloutOf(rollout);
      onSaved(await put<EdgeStack>(`/edge_stacks/${stack.id}`, body));
    } catch (err) {
      setError(errorText(err));
      setBusy(false);
    }
  };
  return (
    <Dialog title={`New version of ${stack.name} (after version ${stack.version})`} onClose={onClose} wide testid="version-form">
      <form onSubmit={submit}>
        <ErrorBanner error={current.error} onRetry={() => void current.reload()} />
        {compose === null ? (
          <p class="loading">Loading version {stack.version}…</p>
        ) : (
          <TextAreaField label="Compose file" value={compose} onInput={setCompose} rows={18} code required testid="version-compose" />
        )}
        <Checkbox label="Change how this version goes out (otherwise: as the last one)" checked={custom} onChange={setCustom} />
        {custom ? <RolloutFields value={rollout} onChange={setRollout} /> : null}
        <FormError error={error} />
        <div class="form-actions">
          <button type="button" class="btn" onClick={onClose}>
            Cancel
          </button>
          <button type="submit" class="btn btn-primary" disabled={busy || compose === null} data-testid="version-submit">
            {busy ? 'Saving…' : `Roll out version ${stack.version + 1}`}
          </button>
        </div>
      </form>
    </Dialog>
  );
}

/** Targets and variables change in place (no new version). */
export function TargetsDialog({ stack, onClose, onSaved }: { stack: EdgeStack; onClose: () => void; onSaved: (s: EdgeStack) => void }) {
  const groups = useEdgeGroups();
  const [groupIds, setGroupIds] = useState<number[]>(stack.edgeGroupIds);
  const [variables, setVariables] = useState(formatVariables(stack.variables));
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const submit = async (e: Event) => {
    e.preventDefault();
    setError(null);
    try {
      const body = { edgeGroupIds: groupIds, variables: parseVariables(variables) };
      setBusy(true);
      onSaved(await put<EdgeStack>(`/edge_stacks/${stack.id}`, body));
    } catch (err) {
      setError(errorText(err));
      setBusy(false);
    }
  };
  return (
    <Dialog title={`Targets and variables of ${stack.name}`} onClose={onClose} wide>
      <form onSubmit={submit}>
        <ErrorBanner error={groups.error} onRetry={() => void groups.reload()} />
        <CheckList legend="Edge groups" items={groups.data ?? []} selected={groupIds} onChange={setGroupIds} />
        <TextAreaField label="Variables (NAME=value, one per line)" value={variables} onInput={setVariables} rows={5} code />
        <p class="hint">These apply to the stack as it is (no new version).</p>
        <FormError error={error} />
        <div class="form-actions">
          <button type="button" class="btn" onClick={onClose}>
            Cancel
          </button>
          <button type="submit" class="btn btn-primary" disabled={busy}>
            {busy ? 'Saving…' : 'Save'}
          </button>
        </div>
      </form>
    </Dialog>
  );
}
