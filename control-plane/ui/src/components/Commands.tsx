// An async environment's commands: newest first, polled, with a form for any command type.

import { useEffect, useRef, useState } from 'preact/hooks';
import { errorText, getPage } from '../api';
import type { Command, CommandType, Environment, NewCommand } from '../types';
import { useNow, useResource } from '../lib/hooks';
import { ago, dateTime, seconds, words } from '../lib/format';
import { Badge, Checkbox, Dialog, Empty, ErrorBanner, FormError, Loading, NumberField, Pager, SelectField, TextAreaField, TextField } from './ui';

const TYPES: { value: CommandType; label: string; target: string }[] = [
  { value: 'containerStart', label: 'Start a container', target: 'Container name or id' },
  { value: 'containerStop', label: 'Stop a container', target: 'Container name or id' },
  { value: 'containerRestart', label: 'Restart a container', target: 'Container name or id' },
  { value: 'containerKill', label: 'Kill a container', target: 'Container name or id' },
  { value: 'containerRemove', label: 'Remove a container', target: 'Container name or id' },
  { value: 'imageRemove', label: 'Remove an image', target: 'Image name, tag or id' },
  { value: 'volumeRemove', label: 'Remove a volume', target: 'Volume name' },
  { value: 'stackRemove', label: 'Remove a compose stack', target: 'Project name' },
  { value: 'stackDeploy', label: 'Deploy a compose stack', target: 'Project name' },
];

/** `onFinished`: a command succeeded or failed since the last look. */
export function CommandHistory({ env, version, onFinished }: { env: Environment; version: number; onFinished?: () => void }) {
  const now = useNow(5000);
  const [start, setStart] = useState(0);
  const limit = 20;
  const list = useResource(
    (signal) => getPage<Command>(`/endpoints/${env.id}/commands`, { start, limit }, signal),
    [env.id, start, version],
    3000,
  );
  const data = list.data;

  // Commands that move on are announced (the table itself refreshes silently).
  const seen = useRef(new Map<number, string>());
  const [announce, setAnnounce] = useState('');
  useEffect(() => {
    if (!data) return;
    const changes: string[] = [];
    let finished = false;
    for (const c of data.items) {
      const before = seen.current.get(c.id);
      if (before !== undefined && before !== c.state) {
        changes.push(`${words(c.type)} ${c.target}: ${c.state}${c.error ? ` (${c.error})` : ''}`);
        if (c.state === 'succeeded' || c.state === 'failed') finished = true;
      }
      seen.current.set(c.id, c.state);
    }
    if (changes.length) setAnnounce(changes.join('. '));
    if (finished) onFinished?.();
  }, [data]);

  return (
    <div>
      <p class="visually-hidden" aria-live="polite">
        {announce}
      </p>
      <p class="muted">
        The agent fetches commands every {seconds(env.commandInterval)}
        {env.commandInterval === 0 ? ' (command fetching is off for this environment)' : ''}; results come back on its next tick.
      </p>
      <ErrorBanner error={list.error} onRetry={() => void list.reload()} />
      {list.loading && !data ? <Loading /> : null}
      {data && data.items.length === 0 ? <Empty>No commands yet.</Empty> : null}
      {data && data.items.length > 0 ? (
        <>
          <div class="table-wrap">
            <table class="table" data-testid="command-history">
              <caption class="visually-hidden">Commands of this environment, newest first</caption>
              <thead>
                <tr>
                  <th scope="col">Command</th>
                  <th scope="col">Target</th>
                  <th scope="col">State</th>
                  <th scope="col">Queued</th>
                  <th scope="col">Sent</th>
                  <th scope="col">Finished</th>
                  <th scope="col">Result</th>
                </tr>
              </thead>
              <tbody>
                {data.items.map((c) => (
                  <tr key={c.id} data-testid="command-row" data-command-id={c.id} data-type={c.type} data-target={c.target} data-state={c.state}>
                    <th scope="row">
                      {words(c.type)}
                      {c.timeoutSecs !== undefined ? <span class="muted"> ({c.timeoutSecs} s)</span> : null}
                      {c.signal ? <span class="muted"> ({c.signal})</span> : null}
                      {c.force ? <span class="muted"> (force)</span> : null}
                    </th>
                    <td>
                      {c.target}
                      {c.services?.length ? <span class="muted"> ({c.services.join(', ')})</span> : null}
                    </td>
                    <td>
                      <Badge value={c.state} testid="command-state" />
                    </td>
                    <td title={dateTime(c.createdAt)}>{ago(c.createdAt, now)}</td>
                    <td title={dateTime(c.sentAt)}>{c.sentAt ? ago(c.sentAt, now) : <span class="muted">–</span>}</td>
                    <td title={dateTime(c.finishedAt)}>{c.finishedAt ? ago(c.finishedAt, now) : <span class="muted">–</span>}</td>
                    <td class={c.error ? 'text-bad wrap' : 'wrap'}>{c.error ?? (c.state === 'succeeded' ? 'done' : '')}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          </div>
          <Pager label="Commands" start={start} limit={limit} total={data.total} onStart={setStart} />
        </>
      ) : null}
    </div>
  );
}

export function QueueDialog({ onQueue, onClose }: { onQueue: (c: NewCommand, what: string) => Promise<void>; onClose: () => void }) {
  const [type, setType] = useState<CommandType>('containerStop');
  const [target, setTarget] = useState('');
  const [timeout, setTimeoutSecs] = useState<number | null>(null);
  const [signal, setSignal] = useState('');
  const [force, setForce] = useState(false);
  const [compose, setCompose] = useState('');
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const def = TYPES.find((t) => t.value === type) ?? TYPES[0];
  const submit = async (e: Event) => {
    e.preventDefault();
    const cmd: NewCommand = { type, target: target.trim() };
    if ((type === 'containerStop' || type === 'containerRestart') && timeout !== null) cmd.timeoutSecs = timeout;
    if (type === 'containerKill' && signal.trim()) cmd.signal = signal.trim();
    if (type === 'containerRemove' || type === 'imageRemove' || type === 'volumeRemove') cmd.force = force;
    if (type === 'stackDeploy') cmd.compose = compose;
    setBusy(true);
    setError(null);
    try {
      await onQueue(cmd, `${words(type)} ${cmd.target}`);
      onClose();
    } catch (err) {
      setError(errorText(err));
      setBusy(false);
    }
  };
  return (
    <Dialog title="Queue a command" onClose={onClose} wide testid="queue-dialog">
      <form onSubmit={submit}>
        <div class="form-row">
          <SelectField label="Command" value={type} onChange={setType} options={TYPES.map((t) => ({ value: t.value, label: t.label }))} />
          <TextField label={def.target} value={target} onInput={setTarget} required autoFocus testid="queue-target" />
        </div>
        {type === 'containerStop' || type === 'containerRestart' ? (
          <NumberField label="Timeout before it is killed (s)" value={timeout} onInput={setTimeoutSecs} min={0} max={3600} placeholder="engine default" />
        ) : null}
        {type === 'containerKill' ? <TextField label="Signal" value={signal} onInput={setSignal} placeholder="SIGKILL" /> : null}
        {type === 'containerRemove' || type === 'imageRemove' || type === 'volumeRemove' ? (
          <Checkbox label="Force (remove even if running or in use)" checked={force} onChange={setForce} />
        ) : null}
        {type === 'stackDeploy' ? (
          <TextAreaField
            label="Compose file"
            value={compose}
            onInput={setCompose}
            rows={12}
            code
            required
            hint="image, command, entrypoint, environment, labels, ports, restart and volumes per service."
          />
        ) : null}
        <FormError error={error} />
        <div class="form-actions">
          <button type="button" class="btn" onClick={onClose}>
            Cancel
          </button>
          <button type="submit" class="btn btn-primary" disabled={busy}>
            {busy ? 'Queueing…' : 'Queue'}
          </button>
        </div>
      </form>
    </Dialog>
  );
}
