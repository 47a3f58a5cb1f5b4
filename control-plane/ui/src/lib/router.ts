// Hash routing: `/ui/#/environments/12?tab=live`. The server only serves files.

import { useEffect, useState } from 'preact/hooks';

export interface Route {
  /** Path segments: `#/environments/12` -> ['environments', '12']. */
  parts: string[];
  query: URLSearchParams;
}

export function parseHash(hash: string): Route {
  const raw = hash.replace(/^#/, '');
  const [path, q = ''] = raw.split('?', 2);
  const parts = path
    .split('/')
    .filter((p) => p !== '')
    .map((p) => {
      try {
        return decodeURIComponent(p);
      } catch {
        return p;
      }
    });
  return { parts, query: new URLSearchParams(q) };
}

export function href(path: string, query?: Record<string, string | number | undefined | null>): string {
  let h = `#${path.startsWith('/') ? path : `/${path}`}`;
  if (query) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) {
      if (v !== undefined && v !== null && v !== '') q.set(k, String(v));
    }
    const s = q.toString();
    if (s) h += `?${s}`;
  }
  return h;
}

export function navigate(path: string, query?: Record<string, string | number | undefined | null>, replace = false): void {
  const h = href(path, query);
  if (replace) {
    history.replaceState(null, '', h);
    window.dispatchEvent(new HashChangeEvent('hashchange'));
  } else {
    location.hash = h;
  }
}

export function useRoute(): Route {
  const [route, setRoute] = useState(() => parseHash(location.hash));
  useEffect(() => {
    const on = () => setRoute(parseHash(location.hash));
    window.addEventListener('hashchange', on);
    return () => window.removeEventListener('hashchange', on);
  }, []);
  return route;
}
