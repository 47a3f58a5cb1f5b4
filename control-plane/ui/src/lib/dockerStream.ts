// Docker's attach/logs stream format. A container without a TTY multiplexes stdout and
// stderr: each frame is an 8-byte header (stream type 0/1/2, three zero bytes, the payload
// length as a big-endian u32) and the payload. With a TTY the stream is the raw bytes.

export type StreamName = 'stdout' | 'stderr';

export interface Chunk {
  stream: StreamName;
  text: string;
}

export type Framing = 'multiplexed' | 'raw' | 'auto';

/** Splits a Docker log stream into text per stream, across reads of any size. */
export class DockerStreamDecoder {
  private framing: Framing;
  private pending: Uint8Array = new Uint8Array(0);
  private readonly decoders: Record<StreamName, TextDecoder> = {
    stdout: new TextDecoder('utf-8'),
    stderr: new TextDecoder('utf-8'),
  };

  constructor(framing: Framing = 'auto') {
    this.framing = framing;
  }

  get mode(): Framing {
    return this.framing;
  }

  push(bytes: Uint8Array): Chunk[] {
    if (this.framing === 'raw') {
      const text = this.decoders.stdout.decode(bytes, { stream: true });
      return text ? [{ stream: 'stdout', text }] : [];
    }
    this.pending = concat(this.pending, bytes);
    if (this.framing === 'auto') {
      if (this.pending.length < 8) return [];
      this.framing = looksMultiplexed(this.pending) ? 'multiplexed' : 'raw';
      if (this.framing === 'raw') {
        const all = this.pending;
        this.pending = new Uint8Array(0);
        return this.push(all);
      }
    }
    const out: Chunk[] = [];
    let off = 0;
    const p = this.pending;
    while (p.length - off >= 8) {
      const type = p[off];
      const size = ((p[off + 4] << 24) >>> 0) + (p[off + 5] << 16) + (p[off + 6] << 8) + p[off + 7];
      if (p.length - off - 8 < size) break;
      const payload = p.subarray(off + 8, off + 8 + size);
      off += 8 + size;
      const stream: StreamName = type === 2 ? 'stderr' : 'stdout';
      const text = this.decoders[stream].decode(payload, { stream: true });
      if (text) out.push({ stream, text });
    }
    this.pending = p.slice(off);
    return out;
  }

  /** What is left at the end of the stream. */
  end(): Chunk[] {
    const out: Chunk[] = [];
    if (this.framing !== 'multiplexed' && this.pending.length) {
      const text = this.decoders.stdout.decode(this.pending, { stream: true });
      if (text) out.push({ stream: 'stdout', text });
    }
    this.pending = new Uint8Array(0);
    for (const s of ['stdout', 'stderr'] as const) {
      const text = this.decoders[s].decode();
      if (text) out.push({ stream: s, text });
    }
    return out;
  }
}

function looksMultiplexed(b: Uint8Array): boolean {
  return b[0] <= 2 && b[1] === 0 && b[2] === 0 && b[3] === 0;
}

function concat(a: Uint8Array, b: Uint8Array): Uint8Array {
  if (a.length === 0) return b;
  const out = new Uint8Array(a.length + b.length);
  out.set(a, 0);
  out.set(b, a.length);
  return out;
}
