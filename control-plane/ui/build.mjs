// Builds the console's assets into dist/: index.html, app.js, app.css (xterm's CSS bundled
// in), favicon.svg. The control plane embeds exactly these files, and a test rebuilds them
// from a clean copy and compares byte for byte, so the output must depend on the sources and
// the lockfile only: no timestamps, no hashes in names, no source maps, no absolute paths.
import * as esbuild from 'esbuild';
import { mkdir, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = dirname(fileURLToPath(import.meta.url));
const dist = join(root, 'dist');
/** Every file dist/ holds after a build; the Rust side embeds this list. */
const FILES = ['app.css', 'app.js', 'favicon.svg', 'index.html'];

const result = await esbuild.build({
  absWorkingDir: root,
  entryPoints: { app: 'src/main.tsx' },
  outdir: 'dist',
  bundle: true,
  minify: true,
  format: 'iife',
  platform: 'browser',
  target: ['chrome115', 'firefox115', 'safari16'],
  charset: 'utf8',
  sourcemap: false,
  legalComments: 'eof',
  define: { 'process.env.NODE_ENV': '"production"' },
  logLevel: 'warning',
  write: false,
});

const outputs = new Map();
for (const f of result.outputFiles) {
  const rel = relative(dist, f.path);
  if (rel !== 'app.js' && rel !== 'app.css') {
    throw new Error(`unexpected build output ${rel}: dist/ must hold only ${FILES.join(', ')}`);
  }
  outputs.set(rel, f.contents);
}
outputs.set('index.html', await readFile(join(root, 'src', 'index.html')));
outputs.set('favicon.svg', await readFile(join(root, 'src', 'favicon.svg')));

// A path of this machine in the output would make it differ from one built elsewhere.
for (const [name, bytes] of outputs) {
  const text = Buffer.from(bytes).toString('utf8');
  const home = process.env.HOME || '';
  if (text.includes(root) || (home.length > 4 && text.includes(home))) {
    throw new Error(`dist/${name} contains an absolute path of this machine`);
  }
}

const names = [...outputs.keys()].sort();
if (JSON.stringify(names) !== JSON.stringify(FILES)) {
  throw new Error(`dist/ would hold ${names.join(', ')}, expected ${FILES.join(', ')}`);
}
await rm(dist, { recursive: true, force: true });
await mkdir(dist, { recursive: true });
for (const name of names) {
  await writeFile(join(dist, name), outputs.get(name));
}
const listed = (await readdir(dist)).sort();
const sizes = await Promise.all(listed.map(async (n) => `${n} ${(await readFile(join(dist, n))).length} B`));
console.log(`dist/: ${sizes.join(', ')}`);
