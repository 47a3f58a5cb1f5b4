// Unit tests of the console's pure modules: each `*.test.mjs` here imports TypeScript sources
// through `load()` (esbuild transforms them in memory) and uses node:test.
import { readdir } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { run } from 'node:test';
import { spec } from 'node:test/reporters';

const here = dirname(fileURLToPath(import.meta.url));
const files = (await readdir(here)).filter((f) => f.endsWith('.test.mjs')).sort().map((f) => join(here, f));
let failed = false;
const stream = run({ files, concurrency: 1 });
stream.on('test:fail', () => {
  failed = true;
});
stream.compose(spec).pipe(process.stdout);
await new Promise((resolve) => stream.on('end', resolve));
if (failed) process.exitCode = 1;
