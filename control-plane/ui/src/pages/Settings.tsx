// Default intervals (environments without their own follow them).

import { useEffect, useState } from 'preact/hooks';
import { errorText, get, patch } from '../api';
import type { Settings } from '../types';
import { useResource } from '../lib/hooks';
import { ErrorBanner, FormError, Loading, NumberField, useNotify } from '../components/ui';

export function SettingsPage() {
  const notify = useNotify();
  const res = useResource((signal) => get<Settings>('/settings', undefined, signal), []);
  const [v, setV] = useState<Settings | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  useEffect(() => {
    if (res.data && !v) setV(res.data);
  }, [res.data, v]);
  const set = (k: keyof Settings, n: number | null) => setV((old) => (old ? { ...old, [k]: n ?? 0 } : old));
  const submit = async (e: Event) => {
    e.preventDefault();
    if (!v || !res.data) return;
    const body: Partial<Settings> = {};
    for (const k of Object.keys(v) as (keyof Settings)[]) if (v[k] !== res.data[k]) body[k] = v[k];
    setBusy(true);
    setError(null);
    try {
      const saved = await patch<Settings>('/settings', body);
      setV(saved);
      await res.reload();
      notify('Settings saved');
    } catch (err) {
      setError(errorText(err));
    } finally {
      setBusy(false);
    }
  };
  const dirty = v && res.data && (Object.keys(v) as (keyof Settings)[]).some((k) => v[k] !== res.data![k]);
  return (
    <div class="page">
      <div class="page-head">
        <h1>Settings</h1>
      </div>
      <ErrorBanner error={res.error} onRetry={() => void res.reload()} />
      {res.loading && !res.data ? <Loading /> : null}
      {v ? (
        <form class="panel form-narrow" onSubmit={submit} data-testid="settings-form">
          <h2>Default intervals</h2>
          <p class="muted">Environments without intervals of their own follow these; agents learn a change on their next check-in.</p>
          <NumberField label="Check-in interval, standard mode (s)" value={v.checkinInterval} onInput={(n) => set('checkinInterval', n)} min={1} max={3600} required hint="1 to 3600. An environment is up while it checked in within two intervals and 20 s." />
          <NumberField label="Ping interval, async mode (s)" value={v.pingInterval} onInput={(n) => set('pingInterval', n)} min={0} max={86400} required />
          <NumberField label="Snapshot interval, async mode (s)" value={v.snapshotInterval} onInput={(n) => set('snapshotInterval', n)} min={0} max={86400} required />
          <NumberField label="Command interval, async mode (s)" value={v.commandInterval} onInput={(n) => set('commandInterval', n)} min={0} max={86400} required hint="0 to 86400; 0 turns it off." />
          <FormError error={error} />
          <div class="form-actions form-actions-left">
            <button type="submit" class="btn btn-primary" disabled={busy || !dirty}>
              {busy ? 'Saving…' : 'Save'}
            </button>
            <button type="button" class="btn" disabled={!dirty} onClick={() => setV(res.data ?? null)}>
              Undo changes
            </button>
          </div>
        </form>
      ) : null}
    </div>
  );
}
