// The console: sign-in, then a left navigation and one page per hash route.

import '@xterm/xterm/css/xterm.css';
import './styles.css';

import type { ComponentChildren } from 'preact';
import { render } from 'preact';
import { useCallback, useEffect, useRef, useState } from 'preact/hooks';
import { errorText, onUnauthorized, session, setCsrfToken } from './api';
import { CatalogProvider } from './lib/catalog';
import { href, useRoute } from './lib/router';
import type { Route } from './lib/router';
import { ErrorBanner, Loading, Notifications } from './components/ui';
import { SignIn } from './pages/SignIn';
import { Overview } from './pages/Overview';
import { Environments } from './pages/Environments';
import { EnvironmentPage } from './pages/Environment';
import { Groups, Tags } from './pages/Catalog';
import { SettingsPage } from './pages/Settings';
import { EdgeGroups } from './pages/EdgeGroups';
import { EdgeStacks } from './pages/EdgeStacks';
import { EdgeStackPage } from './pages/EdgeStack';

type Auth = { state: 'checking' } | { state: 'out'; reason?: string } | { state: 'in'; expiresAt: string } | { state: 'error'; error: string };

function App() {
  const [auth, setAuth] = useState<Auth>({ state: 'checking' });

  const check = useCallback(async () => {
    setAuth({ state: 'checking' });
    try {
      const s = await session.current();
      if (s) {
        setCsrfToken(s.csrfToken);
        setAuth({ state: 'in', expiresAt: s.expiresAt });
      } else {
        setCsrfToken(null);
        setAuth({ state: 'out' });
      }
    } catch (e) {
      setAuth({ state: 'error', error: errorText(e) });
    }
  }, []);

  useEffect(() => {
    onUnauthorized(() => {
      setCsrfToken(null);
      setAuth((a) => (a.state === 'in' ? { state: 'out', reason: 'Your session ended. Sign in again.' } : a));
    });
    void check();
  }, [check]);

  // A session that expires while the page is open: back to sign-in at that moment.
  useEffect(() => {
    if (auth.state !== 'in') return undefined;
    const left = Date.parse(auth.expiresAt) - Date.now();
    if (!Number.isFinite(left)) return undefined;
    const t = setTimeout(() => void check(), Math.max(1000, Math.min(left + 1000, 2 ** 31 - 1)));
    return () => clearTimeout(t);
  }, [auth, check]);

  if (auth.state === 'checking') {
    return (
      <div class="center-page">
        <Loading text="Connecting to the control plane…" />
      </div>
    );
  }
  if (auth.state === 'error') {
    return (
      <div class="center-page">
        <div class="signin-box">
          <h1 class="brand-title">edgeplane</h1>
          <ErrorBanner error={auth.error} onRetry={() => void check()} />
        </div>
      </div>
    );
  }
  if (auth.state === 'out') {
    return (
      <SignIn
        reason={auth.reason}
        onSignedIn={(s) => {
          setCsrfToken(s.csrfToken);
          setAuth({ state: 'in', expiresAt: s.expiresAt });
        }}
      />
    );
  }
  return (
    <CatalogProvider>
      <Shell
        onSignOut={async () => {
          try {
            await session.signOut();
          } finally {
            setCsrfToken(null);
            setAuth({ state: 'out', reason: 'You signed out.' });
          }
        }}
      />
    </CatalogProvider>
  );
}

const NAV: { path: string; label: string; match: string }[] = [
  { path: '/', label: 'Overview', match: '' },
  { path: '/environments', label: 'Environments', match: 'environments' },
  { path: '/edge-groups', label: 'Edge groups', match: 'edge-groups' },
  { path: '/edge-stacks', label: 'Edge stacks', match: 'edge-stacks' },
  { path: '/groups', label: 'Groups', match: 'groups' },
  { path: '/tags', label: 'Tags', match: 'tags' },
  { path: '/settings', label: 'Settings', match: 'settings' },
];

function Shell({ onSignOut }: { onSignOut: () => Promise<void> }) {
  const route = useRoute();
  const section = route.parts[0] ?? '';
  const pathKey = route.parts.join('/');
  const first = useRef(true);
  const mainRef = useRef<HTMLElement>(null);

  // After navigating, focus goes to the new page's heading (screen readers announce it).
  useEffect(() => {
    if (first.current) {
      first.current = false;
      return;
    }
    const h = mainRef.current?.querySelector('h1');
    if (h instanceof HTMLElement) {
      h.tabIndex = -1;
      h.focus({ preventScroll: false });
    }
  }, [pathKey]);

  return (
    <div class="shell">
      <a class="skip-link" href="#main" onClick={(e) => {
        e.preventDefault();
        mainRef.current?.focus();
      }}>
        Skip to content
      </a>
      <nav class="sidenav" aria-label="Main">
        <div class="brand">
          <img src="/ui/favicon.svg" alt="" width={22} height={22} />
          <span>edgeplane</span>
        </div>
        <ul>
          {NAV.map((n) => (
            <li key={n.path}>
              <a href={href(n.path)} aria-current={section === n.match ? 'page' : undefined} data-testid={`nav-${n.match || 'overview'}`}>
                {n.label}
              </a>
            </li>
          ))}
        </ul>
        <div class="sidenav-foot">
          <button type="button" class="btn btn-ghost" onClick={() => void onSignOut()} data-testid="sign-out">
            Sign out
          </button>
        </div>
      </nav>
      <main id="main" ref={mainRef} tabIndex={-1}>
        <Page route={route} />
      </main>
    </div>
  );
}

function Title({ text, children }: { text: string; children: ComponentChildren }) {
  useEffect(() => {
    document.title = `${text} · edgeplane`;
  }, [text]);
  return <>{children}</>;
}

function Page({ route }: { route: Route }) {
  const [a, b] = route.parts;
  switch (a ?? '') {
    case '':
      return (
        <Title text="Overview">
          <Overview />
        </Title>
      );
    case 'environments':
      if (b !== undefined) {
        return (
          <Title text="Environment">
            <EnvironmentPage key={b} id={Number(b)} route={route} />
          </Title>
        );
      }
      return (
        <Title text="Environments">
          <Environments route={route} />
        </Title>
      );
    case 'groups':
      return (
        <Title text="Groups">
          <Groups />
        </Title>
      );
    case 'tags':
      return (
        <Title text="Tags">
          <Tags />
        </Title>
      );
    case 'settings':
      return (
        <Title text="Settings">
          <SettingsPage />
        </Title>
      );
    case 'edge-groups':
      return (
        <Title text="Edge groups">
          <EdgeGroups route={route} />
        </Title>
      );
    case 'edge-stacks':
      if (b !== undefined) {
        return (
          <Title text="Edge stack">
            <EdgeStackPage key={b} id={Number(b)} route={route} />
          </Title>
        );
      }
      return (
        <Title text="Edge stacks">
          <EdgeStacks route={route} />
        </Title>
      );
    default:
      return (
        <Title text="Not found">
          <div class="page">
            <h1>Not found</h1>
            <p>
              There is no page at <code>{location.hash}</code>. <a href={href('/')}>Go to the overview</a>.
            </p>
          </div>
        </Title>
      );
  }
}

const root = document.getElementById('app');
if (root) {
  root.textContent = '';
  render(
    <Notifications>
      <App />
    </Notifications>,
    root,
  );
}
