// Small building blocks: dialogs, fields, badges, pagers, tabs, notifications.

import type { ComponentChildren } from 'preact';
import { createContext } from 'preact';
import { useCallback, useContext, useEffect, useId, useRef, useState } from 'preact/hooks';
import { errorText } from '../api';
import { num, words } from '../lib/format';

// ---------------------------------------------------------------------------------------------
// Notifications: short messages in live regions (polite for news, assertive for failures).

export interface Note {
  id: number;
  kind: 'ok' | 'error' | 'info';
  text: string;
}

type Notify = (text: string, kind?: Note['kind']) => void;
const NotifyContext = createContext<Notify>(() => {});

export function useNotify(): Notify {
  return useContext(NotifyContext);
}

let noteSeq = 0;

export function Notifications({ children }: { children: ComponentChildren }) {
  const [notes, setNotes] = useState<Note[]>([]);
  const dismiss = useCallback((id: number) => setNotes((ns) => ns.filter((n) => n.id !== id)), []);
  const notify = useCallback<Notify>(
    (text, kind = 'ok') => {
      const id = ++noteSeq;
      setNotes((ns) => [...ns.slice(-4), { id, kind, text }]);
      setTimeout(() => dismiss(id), kind === 'error' ? 12000 : 4000);
    },
    [dismiss],
  );
  const list = (kind: 'polite' | 'assertive') =>
    notes
      .filter((n) => (n.kind === 'error') === (kind === 'assertive'))
      .map((n) => (
        <div key={n.id} class={`toast toast-${n.kind}`} data-testid={`toast-${n.kind}`}>
          <span>{n.text}</span>
          <button type="button" class="btn-icon" aria-label="Dismiss message" onClick={() => dismiss(n.id)}>
            ×
          </button>
        </div>
      ));
  return (
    <NotifyContext.Provider value={notify}>
      {children}
      <div class="toasts">
        <div aria-live="polite" aria-relevant="additions text">
          {list('polite')}
        </div>
        <div aria-live="assertive" role="alert">
          {list('assertive')}
        </div>
      </div>
    </NotifyContext.Provider>
  );
}

// ---------------------------------------------------------------------------------------------
// Dialogs (the native <dialog>: modal, focus kept inside, Escape closes).

export function Dialog(props: {
  title: string;
  onClose: () => void;
  children: ComponentChildren;
  wide?: boolean;
  testid?: string;
}) {
  const ref = useRef<HTMLDialogElement>(null);
  const titleId = useId();
  const onClose = useRef(props.onClose);
  onClose.current = props.onClose;
  useEffect(() => {
    const d = ref.current;
    if (d && !d.open) d.showModal();
    return () => {
      if (d?.open) d.close();
    };
  }, []);
  return (
    <dialog
      ref={ref}
      class={props.wide ? 'dialog dialog-wide' : 'dialog'}
      aria-labelledby={titleId}
      data-testid={props.testid}
      onCancel={(e) => {
        e.preventDefault();
        onClose.current();
      }}
    >
      <div class="dialog-head">
        <h2 id={titleId}>{props.title}</h2>
        <button type="button" class="btn-icon" aria-label="Close dialog" onClick={() => onClose.current()}>
          ×
        </button>
      </div>
      <div class="dialog-body">{props.children}</div>
    </dialog>
  );
}

/** A confirmation for something that cannot be undone; shows the action's error in place. */
export function ConfirmDialog(props: {
  title: string;
  children: ComponentChildren;
  confirmLabel: string;
  danger?: boolean;
  onConfirm: () => Promise<unknown>;
  onClose: () => void;
  /** Called instead of `onClose` once the action succeeded. */
  onSuccess?: (result: unknown) => void;
}) {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<string | null>(null);
  const submit = async (e: Event) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      const result = await props.onConfirm();
      if (props.onSuccess) props.onSuccess(result);
      else props.onClose();
    } catch (err) {
      setError(errorText(err));
      setBusy(false);
    }
  };
  return (
    <Dialog title={props.title} onClose={props.onClose} testid="confirm-dialog">
      <form onSubmit={submit}>
        <div class="confirm-text">{props.children}</div>
        <FormError error={error} />
        <div class="form-actions">
          {/* A destructive action starts on Cancel: Enter alone never confirms it. */}
          <button type="button" class="btn" onClick={props.onClose} autoFocus={props.danger}>
            Cancel
          </button>
          <button type="submit" class={props.danger ? 'btn btn-danger' : 'btn btn-primary'} disabled={busy} autoFocus={!props.danger}>
            {busy ? 'Working…' : props.confirmLabel}
          </button>
        </div>
      </form>
    </Dialog>
  );
}

// ---------------------------------------------------------------------------------------------
// Form fields: every control has a label.

export function FormError({ error }: { error: string | null | undefined }) {
  if (!error) return null;
  return (
    <p class="form-error" role="alert">
      {error}
    </p>
  );
}

interface FieldProps {
  label: string;
  hint?: ComponentChildren;
  class?: string;
}

function FieldShell(props: FieldProps & { id: string; hintId: string; children: ComponentChildren }) {
  return (
    <div class={`field ${props.class ?? ''}`}>
      <label for={props.id}>{props.label}</label>
      {props.children}
      {props.hint ? (
        <div class="hint" id={props.hintId}>
          {props.hint}
        </div>
      ) : null}
    </div>
  );
}

export function TextField(
  props: FieldProps & {
    value: string;
    onInput: (v: string) => void;
    required?: boolean;
    placeholder?: string;
    autoFocus?: boolean;
    pattern?: string;
    maxLength?: number;
    testid?: string;
    autoComplete?: string;
    spellcheck?: boolean;
  },
) {
  const id = useId();
  const hintId = `${id}-hint`;
  return (
    <FieldShell {...props} id={id} hintId={hintId}>
      <input
        id={id}
        type="text"
        value={props.value}
        required={props.required}
        placeholder={props.placeholder}
        autoFocus={props.autoFocus}
        pattern={props.pattern}
        maxLength={props.maxLength}
        autoComplete={props.autoComplete ?? 'off'}
        spellcheck={props.spellcheck ?? false}
        aria-describedby={props.hint ? hintId : undefined}
        data-testid={props.testid}
        onInput={(e) => props.onInput(e.currentTarget.value)}
      />
    </FieldShell>
  );
}

/** A whole number field; empty is `null` (the server's default). */
export function NumberField(
  props: FieldProps & {
    value: number | null;
    onInput: (v: number | null) => void;
    min?: number;
    max?: number;
    step?: number | 'any';
    placeholder?: string;
    required?: boolean;
    testid?: string;
  },
) {
  const id = useId();
  const hintId = `${id}-hint`;
  return (
    <FieldShell {...props} id={id} hintId={hintId}>
      <input
        id={id}
        type="number"
        inputMode={props.step === 'any' ? 'decimal' : 'numeric'}
        value={props.value === null ? '' : String(props.value)}
        min={props.min}
        max={props.max}
        step={props.step ?? 1}
        placeholder={props.placeholder}
        required={props.required}
        aria-describedby={props.hint ? hintId : undefined}
        data-testid={props.testid}
        onInput={(e) => {
          const v = e.currentTarget.value;
          props.onInput(v === '' ? null : Number(v));
        }}
      />
    </FieldShell>
  );
}

export function SelectField<T extends string>(
  props: FieldProps & {
    value: T;
    onChange: (v: T) => void;
    options: { value: T; label: string }[];
    testid?: string;
  },
) {
  const id = useId();
  const hintId = `${id}-hint`;
  return (
    <FieldShell {...props} id={id} hintId={hintId}>
      <select
        id={id}
        value={props.value}
        aria-describedby={props.hint ? hintId : undefined}
        data-testid={props.testid}
        onChange={(e) => props.onChange(e.currentTarget.value as T)}
      >
        {props.options.map((o) => (
          <option key={o.value} value={o.value}>
            {o.label}
          </option>
        ))}
      </select>
    </FieldShell>
  );
}

export function TextAreaField(
  props: FieldProps & {
    value: string;
    onInput: (v: string) => void;
    rows?: number;
    required?: boolean;
    placeholder?: string;
    code?: boolean;
    testid?: string;
  },
) {
  const id = useId();
  const hintId = `${id}-hint`;
  return (
    <FieldShell {...props} id={id} hintId={hintId}>
      <textarea
        id={id}
        rows={props.rows ?? 6}
        value={props.value}
        required={props.required}
        placeholder={props.placeholder}
        spellcheck={false}
        class={props.code ? 'code' : undefined}
        aria-describedby={props.hint ? hintId : undefined}
        data-testid={props.testid}
        onInput={(e) => props.onInput(e.currentTarget.value)}
      />
    </FieldShell>
  );
}

export function Checkbox(props: {
  label: ComponentChildren;
  checked: boolean;
  onChange: (v: boolean) => void;
  testid?: string;
}) {
  const id = useId();
  return (
    <div class="check">
      <input
        id={id}
        type="checkbox"
        checked={props.checked}
        data-testid={props.testid}
        onChange={(e) => props.onChange(e.currentTarget.checked)}
      />
      <label for={id}>{props.label}</label>
    </div>
  );
}

/** A set of checkboxes for choosing ids (tags, groups). */
export function CheckList(props: {
  legend: string;
  items: { id: number; name: string }[];
  selected: number[];
  onChange: (ids: number[]) => void;
  empty?: ComponentChildren;
  hint?: ComponentChildren;
}) {
  const toggle = (id: number, on: boolean) =>
    props.onChange(on ? [...props.selected, id] : props.selected.filter((x) => x !== id));
  return (
    <fieldset class="field checklist">
      <legend>{props.legend}</legend>
      {props.items.length === 0 ? (
        <div class="hint">{props.empty ?? 'None defined yet.'}</div>
      ) : (
        <div class="checklist-items">
          {props.items.map((it) => (
            <Checkbox
              key={it.id}
              label={it.name}
              checked={props.selected.includes(it.id)}
              onChange={(on) => toggle(it.id, on)}
            />
          ))}
        </div>
      )}
      {props.hint ? <div class="hint">{props.hint}</div> : null}
    </fieldset>
  );
}

// ---------------------------------------------------------------------------------------------
// Badges, banners, empty states.

const BADGE: Record<string, string> = {
  up: 'ok',
  running: 'ok',
  succeeded: 'ok',
  open: 'ok',
  done: 'ok',
  healthy: 'ok',
  down: 'bad',
  error: 'bad',
  failed: 'bad',
  dead: 'bad',
  aborted: 'bad',
  exited: 'muted',
  never: 'muted',
  closed: 'muted',
  idle: 'muted',
  created: 'muted',
  removed: 'muted',
  pending: 'wait',
  sent: 'wait',
  requested: 'wait',
  acknowledged: 'wait',
  imagesPulled: 'wait',
  deploying: 'wait',
  removing: 'wait',
  rolling: 'wait',
  rollingBack: 'warn',
  paused: 'warn',
  restarting: 'warn',
};

/** A state as a word with a coloured mark (the word carries the meaning, not the colour). */
export function Badge({ value, testid }: { value: string; testid?: string }) {
  return (
    <span class={`badge badge-${BADGE[value] ?? 'muted'}`} data-testid={testid} data-value={value}>
      {words(value)}
    </span>
  );
}

export function ErrorBanner({ error, onRetry }: { error: string | undefined; onRetry?: () => void }) {
  if (!error) return null;
  return (
    <div class="banner banner-error" role="alert">
      <span>{error}</span>
      {onRetry ? (
        <button type="button" class="btn btn-small" onClick={onRetry}>
          Retry
        </button>
      ) : null}
    </div>
  );
}

export function Loading({ text = 'Loading…' }: { text?: string }) {
  return (
    <p class="loading" role="status">
      {text}
    </p>
  );
}

export function Empty({ children }: { children: ComponentChildren }) {
  return <p class="empty">{children}</p>;
}

// ---------------------------------------------------------------------------------------------
// Paging.

export const PAGE_SIZES = [25, 50, 100, 250];

export function Pager(props: {
  start: number;
  limit: number;
  total: number;
  onStart: (start: number) => void;
  onLimit?: (limit: number) => void;
  label: string;
}) {
  const { start, limit, total } = props;
  const first = total === 0 ? 0 : start + 1;
  const last = Math.min(start + limit, total);
  const id = useId();
  const lastStart = total === 0 ? 0 : Math.floor((total - 1) / limit) * limit;
  return (
    <nav class="pager" aria-label={`${props.label} pages`}>
      <span class="pager-text" data-testid="pager-text">
        {total === 0 ? 'None' : `${num(first)}–${num(last)} of ${num(total)}`}
      </span>
      <button type="button" class="btn btn-small" disabled={start === 0} onClick={() => props.onStart(0)}>
        First
      </button>
      <button
        type="button"
        class="btn btn-small"
        disabled={start === 0}
        onClick={() => props.onStart(Math.max(0, start - limit))}
      >
        Previous
      </button>
      <button
        type="button"
        class="btn btn-small"
        disabled={start + limit >= total}
        onClick={() => props.onStart(start + limit)}
      >
        Next
      </button>
      <button
        type="button"
        class="btn btn-small"
        disabled={start + limit >= total}
        onClick={() => props.onStart(lastStart)}
      >
        Last
      </button>
      {props.onLimit ? (
        <span class="pager-size">
          <label for={id}>Per page</label>
          <select id={id} value={String(limit)} onChange={(e) => props.onLimit?.(Number(e.currentTarget.value))}>
            {PAGE_SIZES.map((n) => (
              <option key={n} value={String(n)}>
                {n}
              </option>
            ))}
          </select>
        </span>
      ) : null}
    </nav>
  );
}

// ---------------------------------------------------------------------------------------------
// Tabs (WAI-ARIA tabs: arrow keys move between them).

export interface TabDef {
  id: string;
  label: ComponentChildren;
}

export function Tabs(props: { label: string; tabs: TabDef[]; current: string; onSelect: (id: string) => void; idPrefix: string }) {
  const refs = useRef<(HTMLButtonElement | null)[]>([]);
  const onKey = (e: KeyboardEvent, i: number) => {
    let next = -1;
    if (e.key === 'ArrowRight') next = (i + 1) % props.tabs.length;
    else if (e.key === 'ArrowLeft') next = (i - 1 + props.tabs.length) % props.tabs.length;
    else if (e.key === 'Home') next = 0;
    else if (e.key === 'End') next = props.tabs.length - 1;
    if (next >= 0) {
      e.preventDefault();
      props.onSelect(props.tabs[next].id);
      refs.current[next]?.focus();
    }
  };
  return (
    <div class="tabs" role="tablist" aria-label={props.label}>
      {props.tabs.map((t, i) => {
        const selected = t.id === props.current;
        return (
          <button
            key={t.id}
            ref={(el) => {
              refs.current[i] = el;
            }}
            type="button"
            role="tab"
            id={`${props.idPrefix}-tab-${t.id}`}
            aria-selected={selected}
            aria-controls={`${props.idPrefix}-panel-${t.id}`}
            tabIndex={selected ? 0 : -1}
            class={selected ? 'tab tab-selected' : 'tab'}
            data-testid={`tab-${t.id}`}
            onClick={() => props.onSelect(t.id)}
            onKeyDown={(e) => onKey(e, i)}
          >
            {t.label}
          </button>
        );
      })}
    </div>
  );
}

export function TabPanel(props: { idPrefix: string; id: string; children: ComponentChildren }) {
  return (
    <div
      role="tabpanel"
      id={`${props.idPrefix}-panel-${props.id}`}
      aria-labelledby={`${props.idPrefix}-tab-${props.id}`}
      class="tabpanel"
      tabIndex={0}
    >
      {props.children}
    </div>
  );
}

// ---------------------------------------------------------------------------------------------
// Copying.

export async function copyText(text: string): Promise<void> {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const ta = document.createElement('textarea');
  ta.value = text;
  ta.setAttribute('readonly', '');
  ta.style.position = 'fixed';
  ta.style.opacity = '0';
  document.body.appendChild(ta);
  ta.select();
  try {
    if (!document.execCommand('copy')) throw new Error('the browser refused to copy');
  } finally {
    ta.remove();
  }
}

export function CopyButton({ text, label = 'Copy', what }: { text: string; label?: string; what?: string }) {
  const [state, setState] = useState<'idle' | 'copied' | 'failed'>('idle');
  useEffect(() => {
    if (state === 'idle') return undefined;
    const t = setTimeout(() => setState('idle'), 2000);
    return () => clearTimeout(t);
  }, [state]);
  return (
    <button
      type="button"
      class="btn btn-small"
      aria-label={what ? `${label} ${what}` : undefined}
      onClick={async () => {
        try {
          await copyText(text);
          setState('copied');
        } catch {
          setState('failed');
        }
      }}
    >
      <span aria-live="polite">{state === 'copied' ? 'Copied' : state === 'failed' ? 'Copy failed: select the text' : label}</span>
    </button>
  );
}

/** A definition list of label/value pairs. */
export function Details({ items }: { items: [string, ComponentChildren][] }) {
  return (
    <dl class="details">
      {items.map(([k, v]) => (
        <div key={k} class="details-row">
          <dt>{k}</dt>
          <dd>{v}</dd>
        </div>
      ))}
    </dl>
  );
}

