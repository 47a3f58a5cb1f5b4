// Numbers, sizes and times as the console shows them.

const nf = new Intl.NumberFormat('en');

export function num(n: number | null | undefined): string {
  return n === null || n === undefined ? '–' : nf.format(n);
}

export function bytes(n: number | null | undefined): string {
  if (n === null || n === undefined || n < 0) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : v.toFixed(v < 10 ? 1 : 0)} ${units[i]}`;
}

/** An RFC 3339 time (or epoch seconds) as local date and time. */
export function dateTime(t: string | number | null | undefined): string {
  if (t === null || t === undefined || t === '') return '–';
  const d = typeof t === 'number' ? new Date(t * 1000) : new Date(t);
  if (Number.isNaN(d.getTime())) return String(t);
  const p = (n: number) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

/** How long ago, roughly: "12 s ago", "3 min ago", "2 h ago", "5 d ago". */
export function ago(t: string | number | null | undefined, now = Date.now()): string {
  if (t === null || t === undefined || t === '') return 'never';
  const ms = typeof t === 'number' ? t * 1000 : Date.parse(t);
  if (Number.isNaN(ms)) return String(t);
  const s = Math.round((now - ms) / 1000);
  if (s < -5) return `in ${duration(-s)}`;
  if (s < 5) return 'just now';
  return `${duration(s)} ago`;
}

export function duration(s: number): string {
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} d`;
}

export function seconds(s: number | null | undefined): string {
  if (s === null || s === undefined) return '–';
  if (s === 0) return 'off';
  if (s < 60 || s % 60 !== 0) return `${s} s`;
  if (s < 3600 || s % 3600 !== 0) return `${s / 60} min`;
  return `${s / 3600} h`;
}

export function shortId(id: string | null | undefined, n = 12): string {
  if (!id) return '–';
  return id.replace(/^sha256:/, '').slice(0, n);
}

export function plural(n: number, one: string, many = `${one}s`): string {
  return `${num(n)} ${n === 1 ? one : many}`;
}

/** "rollingBack" -> "rolling back", "imagesPulled" -> "images pulled". */
export function words(camel: string): string {
  return camel.replace(/([a-z])([A-Z])/g, '$1 $2').toLowerCase();
}
