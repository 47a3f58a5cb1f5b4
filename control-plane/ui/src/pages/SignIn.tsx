// Sign-in with the admin API key. The key goes to the server once and is not kept: the
// input is cleared whatever the answer, and the session lives in an HttpOnly cookie.

import { useEffect, useId, useRef, useState } from 'preact/hooks';
import { errorText, session } from '../api';
import type { Session } from '../types';
import { FormError } from '../components/ui';

export function SignIn({ reason, onSignedIn }: { reason?: string; onSignedIn: (s: Session) => void }) {
  const input = useRef<HTMLInputElement>(null);
  const [error, setError] = useState<string | null>(null);
  const [busy, setBusy] = useState(false);
  const id = useId();
  useEffect(() => {
    document.title = 'Sign in · edgeplane';
    input.current?.focus();
  }, []);
  const submit = async (e: Event) => {
    e.preventDefault();
    const el = input.current;
    if (!el) return;
    const key = el.value.trim();
    el.value = '';
    if (!key) {
      setError('Enter the admin API key.');
      el.focus();
      return;
    }
    setBusy(true);
    setError(null);
    try {
      const s = await session.signIn(key);
      onSignedIn(s);
    } catch (err) {
      setError(errorText(err));
      setBusy(false);
      el.focus();
    }
  };
  return (
    <div class="center-page">
      <main class="signin-box">
        <div class="brand brand-large">
          <img src="/ui/favicon.svg" alt="" width={32} height={32} />
          <span>edgeplane</span>
        </div>
        <h1>Sign in</h1>
        {reason ? (
          <p class="banner banner-info" role="status">
            {reason}
          </p>
        ) : null}
        <form onSubmit={submit} data-testid="signin-form">
          <div class="field">
            <label for={id}>Admin API key</label>
            <input
              id={id}
              ref={input}
              type="password"
              name="edgeplane-admin-key"
              autoComplete="off"
              spellcheck={false}
              aria-describedby={`${id}-hint`}
              data-testid="signin-key"
            />
            <div class="hint" id={`${id}-hint`}>
              Printed by the control plane on its first start and kept in <code>data/admin-api-key</code>.
            </div>
          </div>
          <FormError error={error} />
          <div class="form-actions">
            <button type="submit" class="btn btn-primary" disabled={busy} data-testid="signin-submit">
              {busy ? 'Signing in…' : 'Sign in'}
            </button>
          </div>
        </form>
      </main>
    </div>
  );
}
