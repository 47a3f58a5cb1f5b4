// A container's logs, followed: one streamed `GET .../logs?follow=1` through the tunnel, read
// with a ReadableStream and demultiplexed, aborted when the panel closes.

import { useEffect, useLayoutEffect, useRef, useState } from 'preact/hooks';
import { errorText, get, isAbort, send } from '../api';
import { DockerStreamDecoder } from '../lib/dockerStream';
import type { Chunk, Framing } from '../lib/dockerStream';

const MAX_LINES = 3000;

interface Line {
  stream: 'stdout' | 'stderr';
  text: string;
}

export function LogsPanel({ envId, containerId, name, onClose }: { envId: number; containerId: string; name: string; onClose: () => void }) {
  const [lines, setLines] = useState<Line[]>([]);
  const [state, setState] = useState<'connecting' | 'following' | 'ended' | 'error'>('connecting');
  const [error, setError] = useState<string | null>(null);
  const [follow, setFollow] = useState(true);
  const [attempt, setAttempt] = useState(0);
  const [tail, setTail] = useState(200);
  const pre = useRef<HTMLPreElement>(null);
  const atBottom = useRef(true);

  useEffect(() => {
    const ctrl = new AbortController();
    // Lines are gathered here and handed to the view at most ten times a second.
    let buffer: Line[] = [];
    let partial: Record<string, string> = { stdout: '', stderr: '' };
    let flushTimer: ReturnType<typeof setTimeout> | undefined;
    const flush = () => {
      flushTimer = undefined;
      if (!buffer.length) return;
      const add = buffer;
      buffer = [];
      setLines((old) => {
        const all = old.concat(add);
        return all.length > MAX_LINES ? all.slice(all.length - MAX_LINES) : all;
      });
    };
    const take = (chunks: Chunk[], end = false) => {
      for (const c of chunks) {
        const parts = (partial[c.stream] + c.text).split('\n');
        partial[c.stream] = parts.pop() ?? '';
        for (const p of parts) buffer.push({ stream: c.stream, text: p.replace(/\r$/, '') });
      }
      if (end) {
        for (const s of ['stdout', 'stderr'] as const) {
          if (partial[s]) buffer.push({ stream: s, text: partial[s] });
        }
        partial = { stdout: '', stderr: '' };
      }
      if (end) flush();
      else if (!flushTimer) flushTimer = setTimeout(flush, 100);
    };

    setLines([]);
    setState('connecting');
    setError(null);
    (async () => {
      // The container's TTY setting says how its logs are framed.
      let framing: Framing = 'auto';
      try {
        const info = await get<{ Config?: { Tty?: boolean } }>(`/endpoints/${envId}/docker/containers/${encodeURIComponent(containerId)}/json`, undefined, ctrl.signal);
        if (info?.Config && typeof info.Config.Tty === 'boolean') framing = info.Config.Tty ? 'raw' : 'multiplexed';
      } catch (e) {
        if (isAbort(e)) throw e;
      }
      const res = await send('GET', `/endpoints/${envId}/docker/containers/${encodeURIComponent(containerId)}/logs`, {
        query: { follow: 1, stdout: 1, stderr: 1, tail, timestamps: 0 },
        signal: ctrl.signal,
        headers: { Accept: '*/*' },
      });
      const type = res.headers.get('Content-Type') ?? '';
      if (type.includes('multiplexed-stream')) framing = 'multiplexed';
      else if (type.includes('raw-stream')) framing = 'raw';
      setState('following');
      const decoder = new DockerStreamDecoder(framing);
      if (!res.body) throw new Error('the browser gave no stream for the answer');
      const reader = res.body.getReader();
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        if (value) take(decoder.push(value));
      }
      take(decoder.end(), true);
      setState('ended');
    })().catch((e) => {
      if (isAbort(e)) return;
      take([], true);
      setError(errorText(e));
      setState('error');
    });
    return () => {
      ctrl.abort();
      clearTimeout(flushTimer);
    };
  }, [envId, containerId, attempt, tail]);

  useLayoutEffect(() => {
    const el = pre.current;
    if (el && follow && atBottom.current) el.scrollTop = el.scrollHeight;
  }, [lines, follow]);

  const status =
    state === 'connecting'
      ? 'Connecting… (the first call opens the tunnel and can take a few seconds)'
      : state === 'following'
        ? 'Following'
        : state === 'ended'
          ? 'The log stream ended (the container stopped, or the tunnel closed).'
          : `Failed: ${error}`;

  return (
    <section class="panel live-panel" aria-labelledby="logs-title" data-testid="logs-panel">
      <div class="panel-head">
        <h3 id="logs-title">Logs of {name}</h3>
        <div class="toolbar">
          <label class="inline">
            Last{' '}
            <select value={String(tail)} onChange={(e) => setTail(Number(e.currentTarget.value))} aria-label="Lines to show from before">
              {[100, 200, 1000, 5000].map((n) => (
                <option key={n} value={String(n)}>
                  {n}
                </option>
              ))}
            </select>{' '}
            lines
          </label>
          <button type="button" class="btn btn-small" aria-pressed={follow} onClick={() => setFollow(!follow)}>
            {follow ? 'Pause scrolling' : 'Scroll with new lines'}
          </button>
          <button type="button" class="btn btn-small" onClick={() => setLines([])}>
            Clear
          </button>
          {state === 'ended' || state === 'error' ? (
            <button type="button" class="btn btn-small" onClick={() => setAttempt(attempt + 1)}>
              Reconnect
            </button>
          ) : null}
          <button type="button" class="btn btn-small" onClick={onClose} data-testid="logs-close">
            Close logs
          </button>
        </div>
      </div>
      <p class={state === 'error' ? 'status-line text-bad' : 'status-line'} role="status" data-testid="logs-status" data-state={state}>
        {status}
      </p>
      <pre
        ref={pre}
        class="logs"
        tabIndex={0}
        aria-label={`Log lines of ${name}`}
        data-testid="logs-output"
        onScroll={(e) => {
          const el = e.currentTarget;
          atBottom.current = el.scrollHeight - el.scrollTop - el.clientHeight < 24;
        }}
      >
        {lines.map((l, i) => (
          <span key={i} class={l.stream === 'stderr' ? 'log-line log-err' : 'log-line'}>
            {l.text}
            {'\n'}
          </span>
        ))}
      </pre>
    </section>
  );
}
