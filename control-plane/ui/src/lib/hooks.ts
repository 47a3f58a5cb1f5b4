// Loading, polling while the tab is visible, debouncing, a clock for relative times.

import { useCallback, useEffect, useRef, useState } from 'preact/hooks';
import { ApiError, errorText, isAbort } from '../api';

export interface Resource<T> {
  data: T | undefined;
  /** The last load's error (the data, if any, is from an earlier one). */
  error: string | undefined;
  errorStatus: number | undefined;
  /** True until the first load ends. */
  loading: boolean;
  /** Loads again now (and restarts the polling timer). */
  reload: () => Promise<void>;
}

function visible(): boolean {
  return typeof document === 'undefined' || document.visibilityState !== 'hidden';
}

/**
 * Loads with `loader` when `deps` change, and every `pollMs` while the page is visible
 * (paused while the tab is hidden, loaded again as soon as it shows). Earlier data stays
 * while a newer load runs, so pages and polls do not flicker.
 */
export function useResource<T>(
  loader: (signal: AbortSignal) => Promise<T>,
  deps: unknown[],
  pollMs = 0,
): Resource<T> {
  const [state, setState] = useState<{ data?: T; error?: string; errorStatus?: number; done: boolean }>({
    done: false,
  });
  const loaderRef = useRef(loader);
  loaderRef.current = loader;
  const gen = useRef(0);
  const ctrl = useRef<AbortController | null>(null);
  const timer = useRef<ReturnType<typeof setTimeout> | undefined>(undefined);
  const pollRef = useRef(pollMs);
  pollRef.current = pollMs;
  const mounted = useRef(true);

  const load = useCallback(async (): Promise<void> => {
    clearTimeout(timer.current);
    timer.current = undefined;
    ctrl.current?.abort();
    const c = new AbortController();
    ctrl.current = c;
    const my = ++gen.current;
    try {
      const data = await loaderRef.current(c.signal);
      if (my !== gen.current || !mounted.current) return;
      setState({ data, done: true });
    } catch (e) {
      if (isAbort(e) || my !== gen.current || !mounted.current) return;
      setState((s) => ({
        data: s.data,
        error: errorText(e),
        errorStatus: e instanceof ApiError ? e.status : undefined,
        done: true,
      }));
    } finally {
      if (my === gen.current && mounted.current && pollRef.current > 0 && visible()) {
        timer.current = setTimeout(() => void load(), pollRef.current);
      }
    }
  }, []);

  useEffect(() => {
    void load();
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, deps);

  useEffect(() => {
    mounted.current = true;
    const onVisibility = () => {
      if (pollRef.current <= 0) return;
      if (visible()) {
        void load();
      } else {
        clearTimeout(timer.current);
        timer.current = undefined;
      }
    };
    document.addEventListener('visibilitychange', onVisibility);
    return () => {
      mounted.current = false;
      document.removeEventListener('visibilitychange', onVisibility);
      clearTimeout(timer.current);
      ctrl.current?.abort();
    };
  }, [load]);

  return {
    data: state.data,
    error: state.error,
    errorStatus: state.errorStatus,
    loading: !state.done,
    reload: load,
  };
}

export function useDebounced<T>(value: T, ms: number): T {
  const [v, setV] = useState(value);
  useEffect(() => {
    const t = setTimeout(() => setV(value), ms);
    return () => clearTimeout(t);
  }, [value, ms]);
  return v;
}

/** The current time, renewed every `ms` (for "12 s ago"). */
export function useNow(ms = 5000): number {
  const [now, setNow] = useState(() => Date.now());
  useEffect(() => {
    const t = setInterval(() => setNow(Date.now()), ms);
    return () => clearInterval(t);
  }, [ms]);
  return now;
}

/** Whether an async action runs, and a wrapper that sets it. */
export function useBusy(): [boolean, <T>(f: () => Promise<T>) => Promise<T>] {
  const [busy, setBusy] = useState(false);
  const mounted = useRef(true);
  useEffect(
    () => () => {
      mounted.current = false;
    },
    [],
  );
  const run = useCallback(async <T,>(f: () => Promise<T>): Promise<T> => {
    setBusy(true);
    try {
      return await f();
    } finally {
      if (mounted.current) setBusy(false);
    }
  }, []);
  return [busy, run];
}

/** True once `pending` has lasted `ms` (to say "opening the tunnel..." only when it is slow). */
export function useSlow(pending: boolean, ms = 800): boolean {
  const [slow, setSlow] = useState(false);
  useEffect(() => {
    if (!pending) {
      setSlow(false);
      return undefined;
    }
    const t = setTimeout(() => setSlow(true), ms);
    return () => clearTimeout(t);
  }, [pending, ms]);
  return slow;
}
