import { test } from 'node:test';
import assert from 'node:assert/strict';
import { load } from './load.mjs';

const f = await load('src/lib/format.ts');
const r = await load('src/lib/router.ts');

test('relative times', () => {
  const now = Date.parse('2026-01-01T12:00:00Z');
  assert.equal(f.ago(null, now), 'never');
  assert.equal(f.ago('2026-01-01T11:59:58Z', now), 'just now');
  assert.equal(f.ago('2026-01-01T11:59:30Z', now), '30 s ago');
  assert.equal(f.ago('2026-01-01T11:00:00Z', now), '1 h ago');
  assert.equal(f.ago(now / 1000 - 3 * 86400, now), '3 d ago');
  assert.equal(f.ago('2026-01-01T12:05:00Z', now), 'in 5 min');
});

test('intervals, sizes, names', () => {
  assert.equal(f.seconds(0), 'off');
  assert.equal(f.seconds(5), '5 s');
  assert.equal(f.seconds(90), '90 s');
  assert.equal(f.seconds(120), '2 min');
  assert.equal(f.seconds(7200), '2 h');
  assert.equal(f.bytes(512), '512 B');
  assert.equal(f.bytes(4.2e6), '4.0 MiB');
  assert.equal(f.words('rollingBack'), 'rolling back');
  assert.equal(f.words('imagesPulled'), 'images pulled');
  assert.equal(f.shortId('sha256:0123456789abcdef0123'), '0123456789ab');
});

test('hash routes', () => {
  const route = r.parseHash('#/environments/12?tab=live&search=a%20b');
  assert.deepEqual(route.parts, ['environments', '12']);
  assert.equal(route.query.get('search'), 'a b');
  assert.deepEqual(r.parseHash('').parts, []);
  assert.equal(r.href('/environments', { status: 'up', search: '', start: 0, limit: undefined }), '#/environments?status=up&start=0');
});
