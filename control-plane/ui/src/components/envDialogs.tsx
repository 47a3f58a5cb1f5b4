// Dialogs about one environment: create or edit it, its install command, reset its
// association, delete it.

import { useEffect, useId, useState } from 'preact/hooks';
import { del, errorText, get, patch, post } from '../api';
import type { Environment, Install, Mode, Platform, Settings } from '../types';
import { useCatalog } from '../lib/catalog';
import { useResource } from '../lib/hooks';
import {
  CheckList,
  Checkbox,
  ConfirmDialog,
  CopyButton,
  Dialog,
  ErrorBanner,
  FormError,
  Loading,
  NumberField,
  SelectField,
  TabPanel,
  Tabs,
  TextField,
  useNotify,
} from './ui';

interface EnvFormValue {
  name: string;
  mode: Mode;
  groupId: number | null;
  tagIds: number[];
  checkinInterval: number | null;
  pingInterval: number | null;
  snapshotInterval: number | null;
  commandInterval: number | null;
  allowSelfSigned: boolean;
  edgeId: string;
  envVars: string;
}

function fromEnv(e: Environment): EnvFormValue {
  return {
    name: e.name,
    mode: e.mode,
    groupId: e.groupId,
    tagIds: [...e.tagIds],
    checkinInterval: e.checkinInterval,
    pingInterval: e.pingInterval,
    snapshotInterval: e.snapshotInterval,
    commandInterval: e.commandInterval,
    allowSelfSigned: e.allowSelfSigned,
    edgeId: e.edgeId ?? '',
    envVars: e.envVars.join(', '),
  };
}

const BLANK: EnvFormValue = {
  name: '',
  mode: 'standard',
  groupId: null,
  tagIds: [],
  checkinInterval: null,
  pingInterval: null,
  snapshotInterval: null,
  commandInterval: null,
  allowSelfSigned: false,
  edgeId: '',
  envVars: '',
};

function envVarList(s: string): string[] {
  return s
    .split(/[\s,]+/)
    .map((v) => v.trim())
    .filter((v) => v !== '');
}

function ModeRadios({ value, onChange }: { value: Mode; onChange: (m: Mode) => void }) {
  const name = useId();
  return (
    <fieldset class="field radios">
      <legend>Mode</legend>
      <label>
        <input type="radio" name={name} value="standard" checked={value === 'standard'} onChange={() => onChange('standard')} data-testid="mode-standard" />
        Standard: checks in every few seconds; live work through an on-demand tunnel
      </label>
      <label>
        <input type="radio" name={name} value="async" checked={value === 'async'} onChange={() => onChange('async')} data-testid="mode-async" />
        Async: no tunnel; snapshots and queued commands on intervals (metered links)
      </label>
    </fieldset>
  );
}

/** Create (no `env`) or edit an environment. */
export function EnvFormDialog({
  env,
  onClose,
  onSaved,
}: {
  env?: Environment;
  onClose: () => void;
  onSaved: (e: Environment) => void;
}) {
  const cat = useCatalog();
  const initial = env ? fromEnv(env) : BLANK;
  const [v, setV] = useState<EnvFormValue>(initial);
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const settings = useResource((signal) => get<Settings>('/settings', undefined, signal), []);
  // Groups and tags made meanwhile (in another tab) are offered too.
  useEffect(() => {
    void cat.reload();
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, []);
  const set = <K extends keyof EnvFormValue>(k: K, val: EnvFormValue[K]) => setV((old) => ({ ...old, [k]: val }));
  const def = (k: keyof Settings) => (settings.data ? `default: ${settings.data[k]} s` : 'server default');

  const submit = async (e: Event) => {
    e.preventDefault();
    setError(null);
    if (!v.name.trim()) {
      setError('Give the environment a name.');
      return;
    }
    setBusy(true);
    try {
      let saved: Environment;
      if (!env) {
        const body: Record<string, unknown> = { name: v.name.trim(), mode: v.mode, tagIds: v.tagIds };
        if (v.groupId !== null) body.groupId = v.groupId;
        if (v.mode === 'standard' && v.checkinInterval !== null) body.checkinInterval = v.checkinInterval;
        if (v.mode === 'async') {
          if (v.pingInterval !== null) body.pingInterval = v.pingInterval;
          if (v.snapshotInterval !== null) body.snapshotInterval = v.snapshotInterval;
          if (v.commandInterval !== null) body.commandInterval = v.commandInterval;
        }
        if (v.allowSelfSigned) body.allowSelfSigned = true;
        if (v.edgeId.trim()) body.edgeId = v.edgeId.trim();
        const vars = envVarList(v.envVars);
        if (vars.length) body.envVars = vars;
        saved = await post<Environment>('/endpoints', body);
      } else {
        // Only what changed: the intervals shown are the effective ones, and sending them
        // unchanged would turn defaults into overrides.
        const body: Record<string, unknown> = {};
        if (v.name.trim() !== initial.name) body.name = v.name.trim();
        if (v.mode !== initial.mode) body.mode = v.mode;
        if (v.groupId !== initial.groupId) body.groupId = v.groupId;
        if ([...v.tagIds].sort().join() !== [...initial.tagIds].sort().join()) body.tagIds = v.tagIds;
        for (const k of ['checkinInterval', 'pingInterval', 'snapshotInterval', 'commandInterval'] as const) {
          if (v[k] !== initial[k]) body[k] = v[k];
        }
        if (v.allowSelfSigned !== initial.allowSelfSigned) body.allowSelfSigned = v.allowSelfSigned;
        if (v.envVars !== initial.envVars) body.envVars = envVarList(v.envVars);
        saved = Object.keys(body).length ? await patch<Environment>(`/endpoints/${env.id}`, body) : env;
      }
      onSaved(saved);
    } catch (err) {
      setError(errorText(err));
      setBusy(false);
    }
  };

  return (
    <Dialog title={env ? `Edit ${env.name}` : 'Create an environment'} onClose={onClose} wide testid="env-form">
      <form onSubmit={submit} noValidate>
        <TextField label="Name" value={v.name} onInput={(x) => set('name', x)} required autoFocus maxLength={255} testid="env-name" />
        <ModeRadios value={v.mode} onChange={(m) => set('mode', m)} />
        <div class="form-row">
          <SelectField
            label="Group"
            value={v.groupId === null ? '' : String(v.groupId)}
            onChange={(x) => set('groupId', x === '' ? null : Number(x))}
            options={[{ value: '', label: 'No group' }, ...cat.groups.map((g) => ({ value: String(g.id), label: g.name }))]}
            testid="env-group"
          />
        </div>
        <CheckList legend="Tags" items={cat.tags} selected={v.tagIds} onChange={(ids) => set('tagIds', ids)} empty="No tags defined yet (see Tags)." />
        {v.mode === 'standard' ? (
          <div class="form-row">
            <NumberField
              label="Check-in interval (seconds)"
              value={v.checkinInterval}
              onInput={(x) => set('checkinInterval', x)}
              min={1}
              max={3600}
              placeholder={def('checkinInterval')}
              hint="Empty: the default from Settings."
            />
          </div>
        ) : (
          <div class="form-row">
            <NumberField label="Ping interval (s)" value={v.pingInterval} onInput={(x) => set('pingInterval', x)} min={0} max={86400} placeholder={def('pingInterval')} />
            <NumberField label="Snapshot interval (s)" value={v.snapshotInterval} onInput={(x) => set('snapshotInterval', x)} min={0} max={86400} placeholder={def('snapshotInterval')} />
            <NumberField label="Command interval (s)" value={v.commandInterval} onInput={(x) => set('commandInterval', x)} min={0} max={86400} placeholder={def('commandInterval')} hint="0 turns one off; empty: the default." />
          </div>
        )}
        <details class="advanced">
          <summary>Advanced</summary>
          <Checkbox
            label="The agent accepts a self-signed API certificate when polling (EDGE_INSECURE_POLL)"
            checked={v.allowSelfSigned}
            onChange={(x) => set('allowSelfSigned', x)}
          />
          {!env ? (
            <TextField
              label="Pre-assigned Edge ID (UUID, optional)"
              value={v.edgeId}
              onInput={(x) => set('edgeId', x)}
              placeholder="bound on the first check-in when empty"
            />
          ) : null}
          <TextField
            label="Host variables passed to the agent"
            value={v.envVars}
            onInput={(x) => set('envVars', x)}
            hint="Names, separated by commas (for example HTTP_PROXY, NO_PROXY)."
          />
        </details>
        <FormError error={error} />
        <div class="form-actions">
          <button type="button" class="btn" onClick={onClose}>
            Cancel
          </button>
          <button type="submit" class="btn btn-primary" disabled={busy} data-testid="env-form-submit">
            {busy ? 'Saving…' : env ? 'Save' : 'Create'}
          </button>
        </div>
      </form>
    </Dialog>
  );
}

const PLATFORMS: { id: Platform; label: string }[] = [
  { id: 'docker', label: 'Docker' },
  { id: 'swarm', label: 'Swarm' },
  { id: 'kubernetes', label: 'Kubernetes' },
  { id: 'nomad', label: 'Nomad' },
];

/** The install command (or manifest) of an environment, per platform, with a copy button. */
export function InstallDialog({ env, onClose, created }: { env: Pick<Environment, 'id' | 'name'>; onClose: () => void; created?: boolean }) {
  const [platform, setPlatform] = useState<Platform>('docker');
  const res = useResource(
    (signal) => get<Install>(`/endpoints/${env.id}/install`, { platform }, signal),
    [env.id, platform],
  );
  const command = res.data && res.data.platform === platform ? res.data.command : undefined;
  return (
    <Dialog title={created ? `${env.name} created: install its agent` : `Install the agent of ${env.name}`} onClose={onClose} wide testid="install-dialog">
      <p class="muted">
        Run this on the host. The command carries the environment's join key (<code>EDGE_KEY</code>): treat it as a secret.
      </p>
      <Tabs label="Platform" idPrefix="install" tabs={PLATFORMS} current={platform} onSelect={(p) => setPlatform(p as Platform)} />
      <TabPanel idPrefix="install" id={platform}>
        <ErrorBanner error={res.error} onRetry={() => void res.reload()} />
        {command === undefined && !res.error ? <Loading /> : null}
        {command !== undefined ? (
          <>
            <pre class="codeblock" data-testid="install-command" data-platform={platform} aria-label={`${platform} install command`}>
              {command}
            </pre>
            <div class="form-actions form-actions-left">
              <CopyButton text={command} label="Copy" what={`the ${platform} install command`} />
            </div>
          </>
        ) : null}
      </TabPanel>
      <div class="form-actions">
        <button type="button" class="btn btn-primary" onClick={onClose} data-testid="install-done">
          Done
        </button>
      </div>
    </Dialog>
  );
}

export function ResetDialog({ env, onClose, onDone }: { env: Pick<Environment, 'id' | 'name'>; onClose: () => void; onDone: (e: Environment) => void }) {
  const notify = useNotify();
  return (
    <ConfirmDialog
      title={`Reset the association of ${env.name}?`}
      confirmLabel="Reset association"
      danger
      onClose={onClose}
      onConfirm={() => post<Environment>(`/endpoints/${env.id}/association`)}
      onSuccess={(e) => {
        notify(`${env.name}: association reset, new join key issued`);
        onDone(e as Environment);
      }}
    >
      <p>
        The bound Edge ID is forgotten and a <strong>new join key</strong> is issued: the running agent is refused from now
        on. Install the agent again with the new command.
      </p>
    </ConfirmDialog>
  );
}

export function DeleteEnvDialog({ env, onClose, onDone }: { env: Pick<Environment, 'id' | 'name'>; onClose: () => void; onDone: () => void }) {
  const notify = useNotify();
  return (
    <ConfirmDialog
      title={`Delete ${env.name}?`}
      confirmLabel="Delete environment"
      danger
      onClose={onClose}
      onConfirm={async () => {
        await del(`/endpoints/${env.id}`);
        notify(`${env.name} deleted`);
        onDone();
      }}
    >
      <p>
        Environment <strong>{env.name}</strong> (id {env.id}), its snapshot and its commands are deleted, and its agent is
        refused from now on. This cannot be undone.
      </p>
    </ConfirmDialog>
  );
}

/** Which environment dialog is open. */
export type EnvDialog =
  | { kind: 'create' }
  | { kind: 'edit'; env: Environment }
  | { kind: 'install'; env: Pick<Environment, 'id' | 'name'>; created?: boolean }
  | { kind: 'reset'; env: Environment }
  | { kind: 'delete'; env: Environment }
  | null;

export function EnvDialogs({
  dialog,
  setDialog,
  onChanged,
  onDeleted,
}: {
  dialog: EnvDialog;
  setDialog: (d: EnvDialog) => void;
  onChanged: () => void;
  onDeleted?: () => void;
}) {
  const notify = useNotify();
  if (!dialog) return null;
  const close = () => setDialog(null);
  switch (dialog.kind) {
    case 'create':
      return (
        <EnvFormDialog
          onClose={close}
          onSaved={(e) => {
            notify(`Environment ${e.name} created`);
            onChanged();
            setDialog({ kind: 'install', env: e, created: true });
          }}
        />
      );
    case 'edit':
      return (
        <EnvFormDialog
          env={dialog.env}
          onClose={close}
          onSaved={(e) => {
            notify(`${e.name} saved`);
            onChanged();
            close();
          }}
        />
      );
    case 'install':
      return <InstallDialog env={dialog.env} created={dialog.created} onClose={close} />;
    case 'reset':
      return (
        <ResetDialog
          env={dialog.env}
          onClose={close}
          onDone={(e) => {
            onChanged();
            setDialog({ kind: 'install', env: e });
          }}
        />
      );
    case 'delete':
      return (
        <DeleteEnvDialog
          env={dialog.env}
          onClose={close}
          onDone={() => {
            (onDeleted ?? onChanged)();
          }}
        />
      );
    default:
      return null;
  }
}
