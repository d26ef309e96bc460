// Just enough tar for the interop walk: write a small ustar archive in memory
// (PutFiles with ARCHIVE_FORMAT_TAR) and list the regular files of one
// (GetFiles). Written out rather than taken from a package because it is
// short and shows what goes on the wire; a real caller packing a directory
// uses a tar library.
'use strict';

const BLOCK = 512;

function octal(value, width) {
  return value.toString(8).padStart(width - 1, '0') + '\0';
}

function header({ name, mode, size, type }) {
  const h = Buffer.alloc(BLOCK);
  h.write(name, 0, 100);
  h.write(octal(mode, 8), 100);
  h.write(octal(0, 8), 108); // uid
  h.write(octal(0, 8), 116); // gid
  h.write(octal(size, 12), 124);
  h.write(octal(Math.floor(Date.now() / 1000), 12), 136);
  h.write('        ', 148); // checksum counts as spaces while it is summed
  h.write(type, 156);
  h.write('ustar\0' + '00', 257);
  let sum = 0;
  for (const b of h) sum += b;
  h.write(sum.toString(8).padStart(6, '0') + '\0 ', 148);
  return h;
}

function padding(size) {
  return Buffer.alloc((BLOCK - (size % BLOCK)) % BLOCK);
}

// entries: [{name, mode, data?}]; a name ending in "/" is a directory.
function pack(entries) {
  const parts = [];
  for (const e of entries) {
    const dir = e.name.endsWith('/');
    const data = dir ? Buffer.alloc(0) : Buffer.from(e.data);
    parts.push(header({ name: e.name, mode: e.mode, size: data.length, type: dir ? '5' : '0' }), data, padding(data.length));
  }
  parts.push(Buffer.alloc(2 * BLOCK));
  return Buffer.concat(parts);
}

function field(block, start, length) {
  const raw = block.subarray(start, start + length);
  const end = raw.indexOf(0);
  return raw.subarray(0, end < 0 ? length : end).toString('utf8');
}

// {name: contents} of the regular files; pax ("x") and GNU ("L") long names honoured.
function listFiles(archive) {
  const files = {};
  let longName = null;
  for (let at = 0; at + BLOCK <= archive.length;) {
    const h = archive.subarray(at, at + BLOCK);
    if (h.every((b) => b === 0)) break;
    const size = parseInt(field(h, 124, 12).trim() || '0', 8);
    const type = String.fromCharCode(h[156] || 0x30);
    const body = archive.subarray(at + BLOCK, at + BLOCK + size);
    at += BLOCK + size + padding(size).length;
    if (type === 'x') {
      const path = /(?:^|\n)\d+ path=([^\n]*)\n/.exec(body.toString('utf8'));
      if (path) longName = path[1];
      continue;
    }
    if (type === 'L') {
      longName = field(body, 0, body.length);
      continue;
    }
    const prefix = field(h, 257, 6) === 'ustar' ? field(h, 345, 155) : '';
    const name = longName ?? (prefix ? `${prefix}/${field(h, 0, 100)}` : field(h, 0, 100));
    longName = null;
    if (type === '0') files[name.replace(/^\.\//, '')] = body.toString('utf8');
  }
  return files;
}

module.exports = { pack, listFiles };
