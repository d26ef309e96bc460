#!/usr/bin/env node
// sandhub's public API walked as a Node caller would: @grpc/grpc-js, the
// protos loaded at run time from proto/, TLS, and the API key as standard
// per-call credentials (combineChannelCredentials refuses them on an
// insecure channel).
//
// Prints one JSON line per step with what it saw; exits 1 when any step saw
// something other than the contract promises (tests/interop's pytest runs it
// against a real Hub and reads the lines).
//
//   SANDHUB_API_KEY=key-a node interop.js --hub 127.0.0.1:50051 --ca-cert ca.crt
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const { decodeStatus } = require('./details');
const tar = require('./tar');

const PROTO_DIR = path.resolve(__dirname, '../../../proto');
const HELLO = 'hello\n';
const FROM_TAR = 'from tar\n';
const UNKNOWN_ID = 'cnt-000000000000';
// Output on both streams, a pause (so that following really follows), and an exit code of its own.
const PROCESS_SHELL = 'echo out; echo err >&2; sleep 0.5; echo more; exit 3';

// keepCase: field names as in the .proto (container_id); oneofs: each
// message names its set oneof member in `msg`; enums as their names.
const LOAD_OPTIONS = { keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true, includeDirs: [PROTO_DIR] };

class Mismatch extends Error {}

// A mismatch carries what the step saw, so that its line shows both.
function expect(saw, ok, message) {
  if (!ok) throw Object.assign(new Mismatch(message), { saw });
}

function connect(hub, caFile, key) {
  const loaded = grpc.loadPackageDefinition(protoLoader.loadSync(
    ['sandhub/orchestrator/v1/orchestrator.proto', 'sandhub/exec/v1/exec.proto'], LOAD_OPTIONS));
  const bearer = grpc.credentials.createFromMetadataGenerator((_params, callback) => {
    const md = new grpc.Metadata();
    md.set('authorization', `Bearer ${key}`);
    callback(null, md);
  });
  const creds = grpc.credentials.combineChannelCredentials(grpc.credentials.createSsl(fs.readFileSync(caFile)), bearer);
  const containers = new loaded.sandhub.orchestrator.v1.OrchestratorService(hub, creds);
  // The second client shares the first one's channel.
  const exec = new loaded.sandhub.exec.v1.ExecService(hub, creds, { channelOverride: containers.getChannel() });
  return { containers, exec };
}

function deadline() {
  return { deadline: Date.now() + 60_000 };
}

// A unary call as a promise; a failed call's error keeps its trailers in `metadata`.
function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, deadline(), (err, response) => (err ? reject(err) : resolve(response)));
  });
}

async function readAll(stream) {
  const messages = [];
  for await (const m of stream) messages.push(m);
  return messages;
}

class Walk {
  constructor({ containers, exec }) {
    this.containers = containers;
    this.exec = exec;
    this.containerId = '';
  }

  async create() {
    const { container: c } = await unary(this.containers, 'CreateContainer',
      { wait_until_running: true, labels: { interop: 'node' } });
    this.containerId = c.container_id;
    const saw = { container_id: c.container_id, state: c.state, tenant: c.tenant, labels: c.labels };
    expect(saw, c.state === 'CONTAINER_STATE_RUNNING', `state ${c.state}, want RUNNING`);
    expect(saw, /^cnt-[a-z0-9]{12}$/.test(c.container_id), 'container_id is not cnt-<12 of [a-z0-9]>');
    return saw;
  }

  putFiles(messages) {
    return new Promise((resolve, reject) => {
      const call = this.exec.PutFiles(deadline(), (err, response) => (err ? reject(err) : resolve(response)));
      for (const m of messages) call.write(m);
      call.end();
    });
  }

  async putRaw() {
    const r = await this.putFiles([
      { start: { container_id: this.containerId, format: 'ARCHIVE_FORMAT_RAW' } },
      { file: { path: 'hello.txt', mode: 0o644, size: HELLO.length } },
      { data: Buffer.from(HELLO) },
    ]);
    const saw = { files: r.files.map(fileFields), total_bytes: r.total_bytes };
    const sum = crypto.createHash('sha256').update(HELLO).digest('hex');
    expect(saw, r.files.length === 1 && r.files[0].path === '/work/hello.txt' && r.files[0].sha256 === sum &&
      r.total_bytes === HELLO.length, `want /work/hello.txt, ${HELLO.length} bytes, sha256 ${sum}`);
    return saw;
  }

  async putTar() {
    const archive = tar.pack([{ name: 'dir/', mode: 0o755 }, { name: 'dir/a.txt', mode: 0o600, data: FROM_TAR }]);
    const r = await this.putFiles([
      { start: { container_id: this.containerId, destination: 'unpacked', format: 'ARCHIVE_FORMAT_TAR' } },
      { data: archive },
    ]);
    const saw = { files: r.files.map(fileFields), total_bytes: r.total_bytes };
    expect(saw, r.files.length === 1 && r.files[0].path === '/work/unpacked/dir/a.txt' && r.files[0].mode === 0o600,
      'want one regular file, /work/unpacked/dir/a.txt, mode 0600');
    return saw;
  }

  async run() {
    const r = await unary(this.exec, 'Run',
      { container_id: this.containerId, command: { argv: ['cat', 'hello.txt', 'unpacked/dir/a.txt'] } });
    const saw = { exit_code: r.exit_status.exit_code, stdout: r.stdout.toString(), stderr: r.stderr.toString() };
    expect(saw, saw.exit_code === 0 && saw.stdout === HELLO + FROM_TAR, `want exit 0 and ${JSON.stringify(HELLO + FROM_TAR)}`);
    return saw;
  }

  // An Exec call, its `started` message read; `next()` gives the following messages.
  async startExec(start) {
    const call = this.exec.Exec(deadline());
    const messages = call[Symbol.asyncIterator]();
    call.write({ start });
    const first = await messages.next();
    expect({}, !first.done && first.value.msg === 'started', 'first message is not started');
    return { call, messages, pid: first.value.started.pid };
  }

  // Reads stdout until `until(output)` holds, or to the end, whose last message must be exit_status.
  static async output(messages, out, until) {
    for (;;) {
      const { value: m, done } = await messages.next();
      expect({ output: out.text }, !done, 'the stream ended without exit_status');
      if (m.msg === 'stdout') out.text += m.stdout.toString();
      if (m.msg === 'exit_status') {
        const after = await messages.next();
        expect({ output: out.text }, after.done, 'a message after exit_status');
        return m.exit_status;
      }
      if (until && until(out.text)) return null;
    }
  }

  // `cat` echoes stdin and ends once the client half-closes the request stream (end()).
  async execStdinEof() {
    const { call, messages, pid } = await this.startExec(
      { container_id: this.containerId, command: { argv: ['cat'] } });
    call.write({ stdin: Buffer.from('ping\n') });
    call.end();
    const out = { text: '' };
    const exit = await Walk.output(messages, out);
    const saw = { pid, stdout: out.text, exit_code: exit.exit_code };
    expect(saw, out.text === 'ping\n' && exit.exit_code === 0, 'want "ping\\n" and exit 0 after the half-close');
    return saw;
  }

  // `stty size` on the terminal asked for, then again after a resize.
  async execPty() {
    const { call, messages } = await this.startExec({
      container_id: this.containerId,
      command: { argv: ['sh', '-c', 'stty size; read line; stty size'] },
      pty: { rows: 24, cols: 80 },
    });
    const out = { text: '' };
    await Walk.output(messages, out, (text) => text.includes('\n'));
    call.write({ resize: { rows: 40, cols: 120 } });
    call.write({ stdin: Buffer.from('go\n') });
    const exit = await Walk.output(messages, out);
    call.end();
    const sizes = out.text.match(/\d+ \d+/g) ?? [];
    const saw = { output: out.text, sizes, exit_code: exit.exit_code };
    expect(saw, JSON.stringify(sizes) === '["24 80","40 120"]' && exit.exit_code === 0,
      'want sizes ["24 80", "40 120"] and exit 0');
    return saw;
  }

  // A background process, followed to its exit, then read back.
  async process() {
    const ids = { container_id: this.containerId, process_id: 'ticker' };
    const started = await unary(this.exec, 'StartProcess', { ...ids, command: { shell: PROCESS_SHELL } });
    let stdout = '';
    let stderr = '';
    let exit = null;
    for (const m of await readAll(this.exec.AttachProcess({ ...ids, follow: true }, deadline()))) {
      if (m.msg === 'stdout') stdout += m.stdout.data.toString();
      if (m.msg === 'stderr') stderr += m.stderr.data.toString();
      if (m.msg === 'exit_status') exit = m.exit_status;
    }
    const { process: p } = await unary(this.exec, 'GetProcess', ids);
    const saw = {
      created: started.created, stdout, stderr, exit_code: exit?.exit_code, state: p.state,
      shell: p.command.shell, argv: p.command.argv, process_exit_code: p.exit_status?.exit_code,
    };
    expect(saw, started.created, 'created false for a new process id');
    expect(saw, stdout === 'out\nmore\n' && stderr === 'err\n' && exit?.exit_code === 3,
      'want stdout "out\\nmore\\n", stderr "err\\n", exit 3 (exit_status last)');
    expect(saw, p.state === 'PROCESS_STATE_EXITED' && p.exit_status?.exit_code === 3, 'GetProcess: want EXITED with exit code 3');
    expect(saw, p.command.shell === PROCESS_SHELL && p.command.argv.length === 0,
      'GetProcess: want the command as asked (shell, no argv)');
    return saw;
  }

  async download(filePath, format) {
    const [first, ...rest] = await readAll(this.exec.GetFiles(
      { container_id: this.containerId, path: filePath, format }, deadline()));
    expect({}, first?.msg === 'info', 'first message is not info');
    return { info: first.info, data: Buffer.concat(rest.map((m) => m.data)) };
  }

  async getRaw() {
    const { info, data } = await this.download('hello.txt', 'ARCHIVE_FORMAT_RAW');
    const saw = { path: info.path, size: info.size, is_dir: info.is_dir, data: data.toString() };
    expect(saw, info.path === '/work/hello.txt' && info.size === HELLO.length && saw.data === HELLO,
      `want /work/hello.txt, size ${HELLO.length}, ${JSON.stringify(HELLO)}`);
    return saw;
  }

  async getTar() {
    const { info, data } = await this.download('unpacked', 'ARCHIVE_FORMAT_TAR');
    const files = tar.listFiles(data);
    const saw = { path: info.path, size: info.size, is_dir: info.is_dir, files };
    const found = Object.entries(files).some(([name, body]) => name.endsWith('dir/a.txt') && body === FROM_TAR);
    expect(saw, info.size === -1 && info.is_dir && found, 'want size -1, is_dir, and dir/a.txt in the archive');
    return saw;
  }

  async errorNotFound() {
    const saw = await failure(unary(this.containers, 'GetContainer', { container_id: UNKNOWN_ID }));
    expectError(saw, 'NOT_FOUND', 'CONTAINER_NOT_FOUND', { container_id: UNKNOWN_ID });
    return saw;
  }

  // An ExecService error carries the same details.
  async errorProcessNotFound() {
    const ids = { container_id: this.containerId, process_id: 'no-such' };
    const saw = await failure(unary(this.exec, 'GetProcess', ids));
    expectError(saw, 'NOT_FOUND', 'PROCESS_NOT_FOUND', ids);
    return saw;
  }

  async errorInvalidField() {
    const field = 'resources.memory_mib';
    const saw = await failure(unary(this.containers, 'CreateContainer', { resources: { memory_mib: -1 } }));
    expectError(saw, 'INVALID_ARGUMENT', 'INVALID_FIELD', { field });
    expect(saw, saw.bad_request?.length === 1 && saw.bad_request[0].field === field,
      `want a google.rpc.BadRequest with one violation of "${field}"`);
    return saw;
  }

  async delete() {
    const { container: c } = await unary(this.containers, 'DeleteContainer', { container_id: this.containerId });
    const saw = { container_id: c.container_id, state: c.state };
    expect(saw, c.container_id === this.containerId &&
      ['CONTAINER_STATE_TERMINATING', 'CONTAINER_STATE_TERMINATED'].includes(c.state),
    'want the same container, TERMINATING or TERMINATED');
    return saw;
  }
}

function fileFields(f) {
  return { path: f.path, size: f.size, sha256: f.sha256 };
}

// What a caller reads from a failed call: code, the decoded
// grpc-status-details-bin details, and the request id from the trailers.
async function failure(promise) {
  try {
    await promise;
  } catch (err) {
    if (err.code === undefined) throw err;
    return { code: grpc.status[err.code], message: err.details, request_id: err.metadata.get('x-request-id')[0],
      ...decodeStatus(err.metadata) };
  }
  throw new Mismatch('the call succeeded');
}

function expectError(saw, code, reason, metadata) {
  expect(saw, saw.code === code, `code ${saw.code}, want ${code}`);
  const info = saw.error_info;
  expect(saw, info, 'no google.rpc.ErrorInfo in the status details');
  expect(saw, info.domain === 'sandhub.dev' && info.reason === reason,
    `ErrorInfo ${info.domain}/${info.reason}, want sandhub.dev/${reason}`);
  for (const [k, v] of Object.entries(metadata)) {
    expect(saw, info.metadata[k] === v, `ErrorInfo.metadata["${k}"] = ${JSON.stringify(info.metadata[k])}, want "${v}"`);
  }
  expect(saw, saw.error_detail === `ERROR_REASON_${reason}`,
    `sandhub.common.v1.ErrorDetail ${saw.error_detail}, want ERROR_REASON_${reason}`);
  expect(saw, saw.request_id, 'no x-request-id in the trailers');
}

async function step(name, fn) {
  let saw = {};
  let error = null;
  try {
    saw = await fn();
  } catch (err) {
    saw = err.saw ?? {};
    error = err instanceof Mismatch ? err.message : `${err.code !== undefined ? grpc.status[err.code] + ': ' : ''}${err.details ?? err.message}`;
  }
  console.log(JSON.stringify({ step: name, ...saw, ...(error ? { error } : {}) }));
  return error === null;
}

async function main() {
  const { values } = parseArgs({ options: { hub: { type: 'string' }, 'ca-cert': { type: 'string' } } });
  const key = process.env.SANDHUB_API_KEY;
  if (!values.hub || !values['ca-cert'] || !key) {
    console.error('usage: SANDHUB_API_KEY=<key> node interop.js --hub host:port --ca-cert ca.pem');
    return 2;
  }
  const clients = connect(values.hub, values['ca-cert'], key);
  const w = new Walk(clients);
  // A failed step is reported and the walk goes on (more of the contract is
  // checked in one run), except without a container; it is deleted in any case.
  let ok = await step('create', () => w.create());
  if (ok) {
    for (const [name, fn] of [
      ['put_raw', () => w.putRaw()], ['put_tar', () => w.putTar()], ['run', () => w.run()],
      ['exec_stdin_eof', () => w.execStdinEof()], ['exec_pty', () => w.execPty()], ['process', () => w.process()],
      ['get_raw', () => w.getRaw()], ['get_tar', () => w.getTar()],
      ['error_not_found', () => w.errorNotFound()], ['error_process_not_found', () => w.errorProcessNotFound()],
      ['error_invalid_field', () => w.errorInvalidField()],
    ]) {
      ok = (await step(name, fn)) && ok;
    }
    ok = (await step('delete', () => w.delete())) && ok;
  }
  clients.containers.close();
  return ok ? 0 : 1;
}

main().then((code) => { process.exitCode = code; }, (err) => { console.error(err); process.exitCode = 2; });
