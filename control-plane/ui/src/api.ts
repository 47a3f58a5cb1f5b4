// Every call to the control plane goes through here: the session cookie authenticates it (the
// page never sees the cookie nor keeps the admin key), the CSRF token, held in memory only,
// goes on every call that is not a GET or HEAD, and a 401 sends the console back to sign-in.

import type { Session } from './types';

export class ApiError extends Error {
  readonly status: number;
  constructor(status: number, message: string) {
    super(message);
    this.status = status;
    this.name = 'ApiError';
  }
}

let csrfToken: string | null = null;
let unauthorized: (() => void) | null = null;

/** Called on any 401 from a call made while signed in. */
export function onUnauthorized(f: () => void): void {
  unauthorized = f;
}

export function setCsrfToken(token: string | null): void {
  csrfToken = token;
}

export function csrfHeader(): Record<string, string> {
  return csrfToken ? { 'X-CSRF-Token': csrfToken } : {};
}

export type Query = Record<string, string | number | boolean | null | undefined>;

export function apiUrl(path: string, query?: Query): string {
  let url = `/api${path}`;
  if (query) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) {
      if (v === undefined || v === null || v === '') continue;
      q.set(k, String(v));
    }
    const s = q.toString();
    if (s) url += (url.includes('?') ? '&' : '?') + s;
  }
  return url;
}

export interface RequestOptions {
  query?: Query;
  body?: unknown;
  signal?: AbortSignal;
  /** Headers added to the request. */
  headers?: Record<string, string>;
  /** A 401 is the caller's business (sign-in itself). */
  noAuthRedirect?: boolean;
}

/** The `{"message"}` of an error answer, else its status text. */
async function errorOf(res: Response): Promise<ApiError> {
  let message = '';
  try {
    const text = await res.text();
    try {
      const body = JSON.parse(text);
      if (body && typeof body.message === 'string') message = body.message;
    } catch {
      message = text.trim().slice(0, 500);
    }
  } catch {
    // no body
  }
  if (!message) message = `${res.status} ${res.statusText || 'error'}`;
  return new ApiError(res.status, message);
}

/** Sends a request and answers the raw response when it succeeded (2xx, or 304). */
export async function send(method: string, path: string, opts: RequestOptions = {}): Promise<Response> {
  const headers: Record<string, string> = { Accept: 'application/json', ...opts.headers };
  if (method !== 'GET' && method !== 'HEAD') Object.assign(headers, csrfHeader());
  let body: BodyInit | undefined;
  if (opts.body !== undefined) {
    if (typeof opts.body === 'string') {
      body = opts.body;
    } else {
      body = JSON.stringify(opts.body);
    }
    headers['Content-Type'] = 'application/json';
  }
  let res: Response;
  try {
    res = await fetch(apiUrl(path, opts.query), {
      method,
      headers,
      body,
      signal: opts.signal,
      credentials: 'same-origin',
      cache: 'no-store',
    });
  } catch (e) {
    if (e instanceof DOMException && e.name === 'AbortError') throw e;
    throw new ApiError(0, `cannot reach the control plane (${e instanceof Error ? e.message : String(e)})`);
  }
  if (res.status === 401 && !opts.noAuthRedirect && unauthorized) {
    unauthorized();
  }
  if (!res.ok && res.status !== 304) throw await errorOf(res);
  return res;
}

async function json<T>(res: Response): Promise<T> {
  if (res.status === 204 || res.status === 304) return undefined as T;
  const text = await res.text();
  if (!text) return undefined as T;
  try {
    return JSON.parse(text) as T;
  } catch {
    throw new ApiError(res.status, `the answer is not JSON: ${text.slice(0, 200)}`);
  }
}

export async function request<T>(method: string, path: string, opts: RequestOptions = {}): Promise<T> {
  return json<T>(await send(method, path, opts));
}

export const get = <T>(path: string, query?: Query, signal?: AbortSignal) =>
  request<T>('GET', path, { query, signal });
export const post = <T>(path: string, body?: unknown, query?: Query) => request<T>('POST', path, { body, query });
export const put = <T>(path: string, body?: unknown) => request<T>('PUT', path, { body });
export const patch = <T>(path: string, body?: unknown) => request<T>('PATCH', path, { body });
export const del = <T = void>(path: string, query?: Query) => request<T>('DELETE', path, { query });

export interface Page<T> {
  items: T[];
  total: number;
}

/** A page of a paged list, its total from `X-Total-Count`. */
export async function getPage<T>(path: string, query: Query, signal?: AbortSignal): Promise<Page<T>> {
  const res = await send('GET', path, { query, signal });
  const items = (await json<T[]>(res)) ?? [];
  const header = res.headers.get('X-Total-Count');
  const total = header !== null && header !== '' ? Number(header) : items.length;
  return { items, total: Number.isFinite(total) ? total : items.length };
}

/** Every item of a paged list (for the small ones: groups of a fleet, edge groups). */
export async function getAll<T>(path: string, max = 5000): Promise<T[]> {
  const all: T[] = [];
  for (let start = 0; start < max; start += 500) {
    const page = await getPage<T>(path, { start, limit: 500 });
    all.push(...page.items);
    if (page.items.length < 500 || all.length >= page.total) break;
  }
  return all;
}

// Sessions.
export const session = {
  async current(): Promise<Session | null> {
    try {
      const s = await request<Session>('GET', '/auth/session', { noAuthRedirect: true });
      return s ?? null;
    } catch (e) {
      if (e instanceof ApiError && (e.status === 401 || e.status === 403)) return null;
      throw e;
    }
  },
  signIn(apiKey: string): Promise<Session> {
    return request<Session>('POST', '/auth/session', { body: { apiKey }, noAuthRedirect: true });
  },
  async signOut(): Promise<void> {
    await request<void>('DELETE', '/auth/session', { noAuthRedirect: true });
  },
};

export function errorText(e: unknown): string {
  if (e instanceof ApiError) return e.message;
  if (e instanceof Error) return e.message;
  return String(e);
}

export function isAbort(e: unknown): boolean {
  return e instanceof DOMException && e.name === 'AbortError';
}
