// A shell in a container: `docker exec` created through the tunnel, its stream on a WebSocket
// the control plane opens (the session cookie authenticates it), a real terminal (xterm.js).
// Server to browser: binary frames of terminal output; browser to server: keystrokes as
// binary frames (UTF-8); the terminal's size follows the panel through the exec resize call.

import { Terminal } from '@xterm/xterm';
import { FitAddon } from '@xterm/addon-fit';
import { useEffect, useRef, useState } from 'preact/hooks';
import { errorText, post } from '../api';

declare global {
  interface Window {
    /** The open terminal, for the end-to-end test (reads its buffer). */
    __edgeplaneTerm?: Terminal;
  }
}

type ShellState =
  | { s: 'creating' }
  | { s: 'connecting' }
  | { s: 'open' }
  | { s: 'closed'; code: number; reason: string }
  | { s: 'error'; message: string };

function describe(st: ShellState): string {
  switch (st.s) {
    case 'creating':
      return 'Starting the shell… (the first call opens the tunnel and can take a few seconds)';
    case 'connecting':
      return 'Connecting…';
    case 'open':
      return 'Connected';
    case 'closed':
      return `Disconnected${st.code && st.code !== 1000 && st.code !== 1005 ? ` (code ${st.code}${st.reason ? `: ${st.reason}` : ''})` : st.reason ? ` (${st.reason})` : ''}: the shell ended or the connection closed.`;
    case 'error':
      return `Failed: ${st.message}`;
  }
}

export function ShellPanel({ envId, containerId, name, onClose }: { envId: number; containerId: string; name: string; onClose: () => void }) {
  const host = useRef<HTMLDivElement>(null);
  const closeBtn = useRef<HTMLButtonElement>(null);
  const [state, setState] = useState<ShellState>({ s: 'creating' });
  const [command, setCommand] = useState('sh');
  const [running, setRunning] = useState('sh');
  const [attempt, setAttempt] = useState(0);

  useEffect(() => {
    const el = host.current;
    if (!el) return undefined;
    const term = new Terminal({
      cursorBlink: true,
      fontFamily: 'ui-monospace, SFMono-Regular, "DejaVu Sans Mono", Menlo, Consolas, "Liberation Mono", monospace',
      fontSize: 13,
      scrollback: 5000,
      convertEol: false,
      theme: { background: '#0f1720', foreground: '#e6edf3', cursor: '#7fd1ae', selectionBackground: '#35506e' },
    });
    const fit = new FitAddon();
    term.loadAddon(fit);
    term.open(el);
    window.__edgeplaneTerm = term;
    // F6 leaves the terminal (which otherwise keeps Tab for itself).
    term.attachCustomKeyEventHandler((e) => {
      if (e.key === 'F6' && e.type === 'keydown') {
        closeBtn.current?.focus();
        return false;
      }
      return true;
    });
    const safeFit = () => {
      try {
        fit.fit();
      } catch {
        // not laid out yet
      }
    };
    safeFit();

    let ws: WebSocket | null = null;
    let execId: string | null = null;
    let disposed = false;
    let resizeTimer: ReturnType<typeof setTimeout> | undefined;
    const encoder = new TextEncoder();

    const resize = () => {
      if (!execId || disposed || !ws || ws.readyState !== WebSocket.OPEN) return;
      post(`/endpoints/${envId}/docker/exec/${encodeURIComponent(execId)}/resize`, undefined, { h: term.rows, w: term.cols }).catch(() => {
        // An exec that has not started or has ended refuses; the next resize tries again.
      });
    };
    const scheduleResize = () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(resize, 150);
    };

    const dataSub = term.onData((d) => {
      if (ws && ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(d));
    });
    const binSub = term.onBinary((d) => {
      if (ws && ws.readyState === WebSocket.OPEN) ws.send(Uint8Array.from(d, (c) => c.charCodeAt(0) & 0xff));
    });
    const resizeSub = term.onResize(scheduleResize);
    const ro = new ResizeObserver(() => safeFit());
    ro.observe(el);
    const onWindowResize = () => safeFit();
    window.addEventListener('resize', onWindowResize);

    setState({ s: 'creating' });
    (async () => {
      const exec = await post<{ Id: string }>(`/endpoints/${envId}/docker/containers/${encodeURIComponent(containerId)}/exec`, {
        AttachStdin: true,
        AttachStdout: true,
        AttachStderr: true,
        Tty: true,
        Cmd: running.split(/\s+/).filter((x) => x !== ''),
      });
      if (disposed) return;
      execId = exec.Id;
      setState({ s: 'connecting' });
      const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
      ws = new WebSocket(`${scheme}//${location.host}/api/endpoints/${envId}/exec/${encodeURIComponent(execId)}/ws`);
      ws.binaryType = 'arraybuffer';
      ws.onopen = () => {
        if (disposed) return;
        setState({ s: 'open' });
        term.focus();
        safeFit();
        resize();
        // The exec may start a moment after the socket opens: size it once more.
        setTimeout(resize, 400);
      };
      ws.onmessage = (ev) => {
        if (typeof ev.data === 'string') term.write(ev.data);
        else term.write(new Uint8Array(ev.data as ArrayBuffer));
      };
      ws.onclose = (ev) => {
        if (disposed) return;
        setState({ s: 'closed', code: ev.code, reason: ev.reason });
      };
    })().catch((e) => {
      if (!disposed) setState({ s: 'error', message: errorText(e) });
    });

    return () => {
      disposed = true;
      clearTimeout(resizeTimer);
      ro.disconnect();
      window.removeEventListener('resize', onWindowResize);
      dataSub.dispose();
      binSub.dispose();
      resizeSub.dispose();
      if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000, 'closed by the operator');
      if (window.__edgeplaneTerm === term) window.__edgeplaneTerm = undefined;
      term.dispose();
    };
  }, [envId, containerId, attempt, running]);

  const ended = state.s === 'closed' || state.s === 'error';
  return (
    <section class="panel live-panel" aria-labelledby="shell-title" data-testid="shell-panel">
      <div class="panel-head">
        <h3 id="shell-title">Shell in {name}</h3>
        <form
          class="toolbar"
          onSubmit={(e) => {
            e.preventDefault();
            if (command.trim() === running) setAttempt(attempt + 1);
            else setRunning(command.trim() || 'sh');
          }}
        >
          <label class="inline">
            Command{' '}
            <input class="input-small" value={command} onInput={(e) => setCommand(e.currentTarget.value)} spellcheck={false} autoComplete="off" />
          </label>
          <button type="submit" class="btn btn-small">
            {ended ? 'Start again' : 'Restart'}
          </button>
          <button type="button" class="btn btn-small" ref={closeBtn} onClick={onClose} data-testid="shell-close">
            Close shell
          </button>
        </form>
      </div>
      <p class={state.s === 'error' ? 'status-line text-bad' : 'status-line'} role="status" data-testid="shell-status" data-state={state.s}>
        {describe(state)} <span class="muted">F6 moves the focus out of the terminal.</span>
      </p>
      <div class="ep-terminal" ref={host} data-testid="terminal" />
    </section>
  );
}
