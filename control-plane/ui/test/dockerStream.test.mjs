import { test } from 'node:test';
import assert from 'node:assert/strict';
import { load } from './load.mjs';

const { DockerStreamDecoder } = await load('src/lib/dockerStream.ts');

function frame(type, text) {
  const payload = new TextEncoder().encode(text);
  const out = new Uint8Array(8 + payload.length);
  out[0] = type;
  new DataView(out.buffer).setUint32(4, payload.length);
  out.set(payload, 8);
  return out;
}
const cat = (...parts) => {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
};
const text = (chunks, stream) =>
  chunks
    .filter((c) => !stream || c.stream === stream)
    .map((c) => c.text)
    .join('');

test('multiplexed frames split stdout from stderr', () => {
  const d = new DockerStreamDecoder('multiplexed');
  const chunks = d.push(cat(frame(1, 'out 1\n'), frame(2, 'err 1\n'), frame(1, 'out 2\n')));
  assert.equal(text(chunks, 'stdout'), 'out 1\nout 2\n');
  assert.equal(text(chunks, 'stderr'), 'err 1\n');
});

test('frames cut anywhere across reads, even inside a header or a UTF-8 character', () => {
  const bytes = cat(frame(1, 'héllo wörld\n'), frame(2, 'ünïcode ✓\n'), frame(1, 'x'.repeat(20000)));
  for (const size of [1, 3, 7, 8, 9, 100, 65536]) {
    const d = new DockerStreamDecoder('multiplexed');
    const chunks = [];
    for (let i = 0; i < bytes.length; i += size) chunks.push(...d.push(bytes.subarray(i, i + size)));
    chunks.push(...d.end());
    assert.equal(text(chunks, 'stdout'), `héllo wörld\n${'x'.repeat(20000)}`, `reads of ${size}`);
    assert.equal(text(chunks, 'stderr'), 'ünïcode ✓\n', `reads of ${size}`);
  }
});

test('raw (TTY) streams are text as they come', () => {
  const d = new DockerStreamDecoder('raw');
  const enc = new TextEncoder().encode('a\u00e9b\r\n');
  const chunks = [...d.push(enc.subarray(0, 2)), ...d.push(enc.subarray(2)), ...d.end()];
  assert.equal(text(chunks), 'a\u00e9b\r\n');
});

test('auto: a stream that starts with a frame header is multiplexed', () => {
  const d = new DockerStreamDecoder('auto');
  const bytes = frame(1, 'hello\n');
  const chunks = [...d.push(bytes.subarray(0, 5)), ...d.push(bytes.subarray(5))];
  assert.equal(d.mode, 'multiplexed');
  assert.equal(text(chunks), 'hello\n');
});

test('auto: anything else is raw, short streams included', () => {
  const d = new DockerStreamDecoder('auto');
  const chunks = [...d.push(new TextEncoder().encode('plain text log line\n')), ...d.end()];
  assert.equal(d.mode, 'raw');
  assert.equal(text(chunks), 'plain text log line\n');
  const short = new DockerStreamDecoder('auto');
  assert.equal(text([...short.push(new TextEncoder().encode('hi')), ...short.end()]), 'hi');
});

test('an incomplete frame at the end is dropped, not shown as garbage', () => {
  const d = new DockerStreamDecoder('multiplexed');
  const bytes = frame(1, 'complete\n');
  const chunks = [...d.push(cat(bytes, frame(1, 'cut off').subarray(0, 10))), ...d.end()];
  assert.equal(text(chunks), 'complete\n');
});
