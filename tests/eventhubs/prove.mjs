// Proves the test peer (peer.mjs) against Microsoft's own client, @azure/event-hubs: if the peer
// answered what the real service does not (or the other way round), the connector's tests against
// it would prove nothing. Starts the peer on a free port with a fresh data directory, then checks,
// with the client's own calls:
//   hub and partition properties; sends (a batch to a partition id, a batch with a partition key,
//   single events with application and message properties, events to the hub round robin);
//   reading every partition back from the start (bodies, properties, sequence numbers, offsets);
//   reading from a sequence number (exclusive, inclusive), an offset (exclusive, inclusive), an
//   enqueued time, the latest event and a position not reached yet; owner levels (a higher one
//   takes the partition, a lower one and one without are refused); a restart of the peer on the
//   same data directory (same events, same sequence numbers and offsets, numbering goes on).
// Then, with plain rhea, what the client does not show: every field of the performatives (rhea
// would leave trailing ones out, which prove.py's client cannot read), the AMQP types on the wire
// (partition ids an array, status codes ints, the x-opt-* annotations, a sender's own types kept),
// the selector filter's other spellings and its echo, max-message-size, detach answered in kind,
// SASL PLAIN. prove.py does the same with Microsoft's Python client, another AMQP stack.
// One line per check; exits 1 if any failed.
//
//   node tests/eventhubs/prove.mjs

import { EventHubConsumerClient, EventHubProducerClient, earliestEventPosition, latestEventPosition } from '@azure/event-hubs';
import rhea from 'rhea';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const HUB = 'prove';
const RR_HUB = 'prove-round-robin';
const WIRE_HUB = 'prove-wire';
const SELECTOR = 'apache.org:selector-filter:string';
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const seqs = (events) => events.map((e) => e.sequenceNumber).join(',');

let failures = 0;
let passes = 0;
function check(ok, what, detail = '') {
  console.log(`${ok ? 'ok  ' : 'FAIL'} ${what}${detail ? `: ${detail}` : ''}`);
  if (ok) passes++;
  else failures++;
  return ok;
}

async function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

/** Starts the peer and waits for its `listening on` line. */
async function startPeer(port, data, readyFile) {
  const child = spawn(process.execPath, [path.join(HERE, 'peer.mjs'), '--port', String(port), '--data', data, '--partitions', '4', '--ready-file', readyFile], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('the peer did not start within 15 s')), 15000);
    let out = '';
    child.stdout.on('data', (b) => {
      out += b;
      if (out.includes(`listening on 127.0.0.1:${port}`)) {
        clearTimeout(timer);
        resolve();
      }
    });
    child.on('exit', (code) => reject(new Error(`the peer exited with ${code}`)));
  });
  child.stdout.resume();
  return child;
}

async function stopPeer(child) {
  if (child.exitCode !== null) return;
  const exited = new Promise((r) => child.on('exit', r));
  child.kill('SIGTERM');
  await exited;
}

/** Reads partition `p` from `position` until `count` events arrived (or 10 s passed), then a
 * little longer, so that any event beyond `count` would show. */
async function read(client, p, position, count, options = {}) {
  const got = [];
  const errors = [];
  const sub = client.subscribe(
    p,
    {
      processEvents: async (events) => {
        got.push(...events);
      },
      processError: async (err) => {
        errors.push(err);
      },
    },
    { startPosition: position, maxWaitTimeInSeconds: 1, ...options },
  );
  const until = Date.now() + 10000;
  while (got.length < count && Date.now() < until && !errors.length) await sleep(50);
  await sleep(300);
  await sub.close();
  return { got, errors };
}

/** Subscribes and keeps what arrives; `stop()` closes. `attached()` waits for the client's first
 * call of processEvents: with maxWaitTimeInSeconds it calls it (empty, if nothing came) once that
 * long has passed with its link attached, so events sent after it are sent to an attached link. */
function follow(client, p, position, options = {}) {
  const got = [];
  const errors = [];
  let calls = 0;
  const sub = client.subscribe(
    p,
    {
      processEvents: async (ev) => {
        calls++;
        got.push(...ev);
      },
      processError: async (e) => void errors.push(e),
    },
    { startPosition: position, maxWaitTimeInSeconds: 1, ...options },
  );
  return { got, errors, stop: () => sub.close(), attached: () => waitFor(() => calls > 0) };
}

async function waitFor(cond, ms = 10000) {
  const until = Date.now() + ms;
  while (!cond() && Date.now() < until) await sleep(50);
  return cond();
}

const port = await freePort();
const data = fs.mkdtempSync(path.join(os.tmpdir(), 'iomt-eh-prove-'));
const readyFile = path.join(data, 'ready');
const cs = (hub) => `Endpoint=sb://127.0.0.1:${port};SharedAccessKeyName=k;SharedAccessKey=dmFsdWU=;UseDevelopmentEmulator=true;EntityPath=${hub}`;
let peer = await startPeer(port, data, readyFile);
const producer = new EventHubProducerClient(cs(HUB));
const consumer = new EventHubConsumerClient('$Default', cs(HUB));
const extraClients = [];
const client = (hub = HUB) => {
  const c = new EventHubConsumerClient('$Default', cs(hub));
  extraClients.push(c);
  return c;
};

try {
  check(fs.readFileSync(readyFile, 'utf8').trim() === `127.0.0.1:${port}`, 'the ready file names the address');

  // ---------------------------------------------------------------- properties
  const props = await producer.getEventHubProperties();
  check(props.name === HUB && props.partitionIds.join(',') === '0,1,2,3' && props.createdOn instanceof Date && !isNaN(props.createdOn),
    'hub properties (4 partitions)', JSON.stringify(props));
  const empty = await producer.getPartitionProperties('2');
  check(empty.isEmpty === true && empty.lastEnqueuedSequenceNumber === -1 && empty.partitionId === '2' && empty.eventHubName === HUB,
    'properties of an empty partition', JSON.stringify(empty));

  // ---------------------------------------------------------------- sends
  // A batch to partition 0, then single events with application and message properties.
  const batch = await producer.createBatch({ partitionId: '0' });
  for (let i = 0; i < 3; i++) batch.tryAdd({ body: { n: i } });
  await producer.sendBatch(batch);
  for (let i = 3; i < 5; i++) {
    // A few milliseconds apart, so that reading from an enqueued time has a boundary to find.
    await sleep(5);
    await producer.sendBatch(
      [{ body: { n: i }, properties: { device: 'd-1', n: i }, messageId: `m-${i}`, correlationId: `c-${i}`, contentType: 'application/json' }],
      { partitionId: '0' },
    );
  }
  // A batch with a partition key: all of it on one partition, the key on every event.
  const keyed = await producer.createBatch({ partitionKey: 'device-42' });
  for (let i = 0; i < 4; i++) keyed.tryAdd({ body: { k: i } });
  await producer.sendBatch(keyed);
  // To the hub with neither: spread round robin (another hub, so that hub's partitions stay as above).
  const rrProducer = new EventHubProducerClient(cs(RR_HUB));
  await rrProducer.sendBatch([0, 1, 2, 3, 4, 5, 6, 7].map((r) => ({ body: { r } })));
  const rrCounts = [];
  for (const p of ['0', '1', '2', '3']) rrCounts.push((await rrProducer.getPartitionProperties(p)).lastEnqueuedSequenceNumber + 1);
  await rrProducer.close();
  check(rrCounts.join(',') === '2,2,2,2', 'events without a partition key go round robin', rrCounts.join(','));

  // ---------------------------------------------------------------- read back
  // (read each partition until as many events came as its properties say it has)
  const perPartition = {};
  for (const p of ['0', '1', '2', '3']) {
    const n = (await producer.getPartitionProperties(p)).lastEnqueuedSequenceNumber + 1;
    perPartition[p] = (await read(consumer, p, earliestEventPosition, n)).got;
  }
  const total = Object.values(perPartition).reduce((n, l) => n + l.length, 0);
  check(total === 9, 'every partition read from the start: all 9 events', Object.entries(perPartition).map(([p, l]) => `${p}:${l.length}`).join(' '));
  const p0 = perPartition['0'];
  check(p0.map((e) => e.body.n).join(',') === '0,1,2,3,4', 'partition 0: bodies in order', p0.map((e) => JSON.stringify(e.body)).join(' '));
  check(seqs(p0) === '0,1,2,3,4', 'partition 0: sequence numbers from 0', seqs(p0));
  const offsets = p0.map((e) => e.offset);
  check(offsets.every((o) => typeof o === 'string' && /^\d+$/.test(o)) && offsets[0] === '0' &&
    offsets.every((o, i) => i === 0 || (BigInt(o) > BigInt(offsets[i - 1]) && o !== String(i))),
  'partition 0: offsets are growing strings (byte positions, not sequence numbers)', offsets.join(','));
  check(p0.every((e, i) => e.enqueuedTimeUtc instanceof Date && (i === 0 || e.enqueuedTimeUtc >= p0[i - 1].enqueuedTimeUtc)),
    'partition 0: enqueued times never go back', p0.map((e) => e.enqueuedTimeUtc.getTime()).join(','));
  const e4 = p0[4];
  check(e4?.properties?.device === 'd-1' && e4?.properties?.n === 4, 'application properties', JSON.stringify(e4?.properties));
  check(e4?.messageId === 'm-4' && e4?.correlationId === 'c-4' && e4?.contentType === 'application/json',
    'message properties (message id, correlation id, content type)', JSON.stringify({ id: e4?.messageId, c: e4?.correlationId, t: e4?.contentType }));
  check(p0.every((e) => e.partitionKey == null), 'no partition key where none was sent');
  const keyedPartitions = Object.entries(perPartition).filter(([p, l]) => p !== '0' && l.length);
  const [kp, kEvents] = keyedPartitions[0] ?? [];
  check(keyedPartitions.length === 1 && kEvents.length === 4 && kEvents.every((e) => e.partitionKey === 'device-42') &&
    kEvents.map((e) => e.body.k).join(',') === '0,1,2,3', 'a partition key keeps its batch on one partition, the key on each event', `partition ${kp}`);

  const pp0 = await producer.getPartitionProperties('0');
  check(pp0.lastEnqueuedSequenceNumber === 4 && pp0.lastEnqueuedOffset === offsets[4] && !pp0.isEmpty && pp0.beginningSequenceNumber === 0 &&
    pp0.lastEnqueuedOnUtc.getTime() === e4.enqueuedTimeUtc.getTime(), 'partition properties match the last event', JSON.stringify(pp0));

  // ---------------------------------------------------------------- start positions
  let r = await read(consumer, '0', { sequenceNumber: 2 }, 2);
  check(seqs(r.got) === '3,4', 'from a sequence number, exclusive', seqs(r.got));
  r = await read(consumer, '0', { sequenceNumber: 2, isInclusive: true }, 3);
  check(seqs(r.got) === '2,3,4', 'from a sequence number, inclusive', seqs(r.got));
  r = await read(consumer, '0', { offset: offsets[3] }, 1);
  check(seqs(r.got) === '4', 'from an offset, exclusive', seqs(r.got));
  r = await read(consumer, '0', { offset: offsets[3], isInclusive: true }, 2);
  check(seqs(r.got) === '3,4', 'from an offset, inclusive', seqs(r.got));
  // The client sends `x-opt-enqueued-time > 'ms'` for enqueuedOn: events enqueued after it.
  r = await read(consumer, '0', { enqueuedOn: p0[2].enqueuedTimeUtc }, 2);
  check(seqs(r.got) === '3,4', 'from an enqueued time (events enqueued after it)', seqs(r.got));

  // From the latest: only what is sent after subscribing.
  let f = follow(consumer, '0', latestEventPosition);
  await f.attached();
  await producer.sendBatch([{ body: { n: 5 } }], { partitionId: '0' });
  await waitFor(() => f.got.length >= 1);
  await sleep(300);
  await f.stop();
  check(f.got.map((e) => e.body.n).join(',') === '5' && seqs(f.got) === '5', 'from the latest event: only new ones', f.got.map((e) => JSON.stringify(e.body)).join(' '));

  // A position not reached yet (after sequence number 6, with 5 the last): waits, skips 6, gives 7.
  f = follow(consumer, '0', { sequenceNumber: 6 });
  await f.attached();
  await producer.sendBatch([{ body: { n: 6 } }], { partitionId: '0' });
  await producer.sendBatch([{ body: { n: 7 } }], { partitionId: '0' });
  await waitFor(() => f.got.length >= 1);
  await sleep(300);
  await f.stop();
  check(seqs(f.got) === '7', 'from a position not reached yet: only what comes after it', seqs(f.got));

  // ---------------------------------------------------------------- owner levels
  // One EventHubConsumerClient keeps one subscription per partition, so each receiver here is its
  // own client (as it would be its own process).
  const low = follow(client(), kp, earliestEventPosition, { ownerLevel: 1 });
  check(await waitFor(() => low.got.length === 4), 'a receiver with owner level 1 reads', `${low.got.length} events`);
  const high = follow(client(), kp, earliestEventPosition, { ownerLevel: 2 });
  await waitFor(() => high.got.length === 4 && low.errors.length > 0);
  check(high.got.length === 4 && !high.errors.length, 'a receiver with owner level 2 attaches and reads', `${high.got.length} events ${high.errors.map(String)}`);
  check(low.errors.some((e) => e.code === 'ReceiverDisconnectedError' || /stolen/i.test(e.message)),
    'the owner level 1 receiver is cut off (amqp:link:stolen)', low.errors.map((e) => `${e.code}: ${e.message}`).join('; '));
  const lower = follow(client(), kp, earliestEventPosition, { ownerLevel: 1 });
  await waitFor(() => lower.errors.length > 0, 5000);
  check(lower.errors.some((e) => e.code === 'ReceiverDisconnectedError') && !lower.got.length, 'a lower owner level is refused',
    lower.errors.map((e) => `${e.code}: ${e.message}`)[0]);
  const none = follow(client(), kp, earliestEventPosition);
  await waitFor(() => none.errors.length > 0, 5000);
  check(none.errors.some((e) => e.code === 'ReceiverDisconnectedError') && !none.got.length, 'a receiver without an owner level is refused while one with a level holds the partition',
    none.errors.map((e) => `${e.code}: ${e.message}`)[0]);
  const other = follow(new EventHubConsumerClient('other-group', cs(HUB)), kp, earliestEventPosition);
  await waitFor(() => other.got.length === 4, 5000);
  check(other.got.length === 4 && !other.errors.length, 'owner levels are per consumer group', `${other.got.length} events`);
  check(high.errors.length === 0, 'the owner level 2 receiver keeps the partition throughout');
  for (const s of [low, high, lower, none, other]) await s.stop();

  // ---------------------------------------------------------------- restart
  const before = (await read(consumer, '0', earliestEventPosition, 8)).got;
  await stopPeer(peer);
  check(!fs.existsSync(readyFile), 'the ready file goes when the peer stops');
  peer = await startPeer(port, data, readyFile);
  const after = (await read(consumer, '0', earliestEventPosition, 8)).got;
  const view = (l) => l.map((e) => `${e.sequenceNumber}@${e.offset}=${JSON.stringify(e.body)}`).join(' ');
  check(after.length === 8 && view(after) === view(before), 'a restarted peer serves the same events at the same sequence numbers and offsets', view(after));
  check(after.every((e, i) => e.enqueuedTimeUtc.getTime() === before[i].enqueuedTimeUtc.getTime()), '... with the same enqueued times');
  const propsAgain = await producer.getEventHubProperties();
  check(propsAgain.createdOn.getTime() === props.createdOn.getTime(), '... and the same hub creation time');
  await producer.sendBatch([{ body: { n: 8 } }], { partitionId: '0' });
  r = await read(consumer, '0', { sequenceNumber: 7 }, 1);
  check(seqs(r.got) === '8' && BigInt(r.got[0].offset) > BigInt(before[7].offset), 'numbering goes on after a restart', view(r.got));

  // ---------------------------------------------------------------- the wire, with plain rhea
  await wireChecks();
} catch (err) {
  check(false, 'unexpected error', err?.stack ?? String(err));
} finally {
  for (const c of [producer, consumer, ...extraClients]) await c.close().catch(() => {});
  await stopPeer(peer);
  fs.rmSync(data, { recursive: true, force: true });
}
console.log(`${passes} passed, ${failures} failed`);
console.log(failures ? 'the test peer does NOT behave as Microsoft\'s client expects' : 'the test peer behaves as Microsoft\'s client expects');
process.exit(failures ? 1 : 0);

// ==================================================================== wire checks (plain rhea)

/** The AMQP sections of an encoded message, with their typed (undecoded) values. */
function sectionsOf(buffer) {
  const reader = new rhea.types.Reader(buffer);
  const out = {};
  while (reader.remaining()) {
    const s = reader.read();
    const code = Number(s.descriptor.value);
    if (code === 0x75) (out[code] ??= []).push(s);
    else out[code] = s;
  }
  return out;
}

/** A typed map's entries, by key, as { type: the AMQP type's name, value }. */
function typedMap(typed) {
  const out = {};
  const items = typed?.value ?? [];
  for (let i = 0; i + 1 < items.length; i += 2) out[items[i].value] = { type: items[i + 1].type.name, value: items[i + 1].value, typed: items[i + 1] };
  return out;
}

async function wireChecks() {
  // rhea hands over decoded messages only; the bytes are kept here to see the types on the wire.
  const raw = new WeakMap();
  const decode = rhea.message.decode;
  rhea.message.decode = (buffer) => {
    const m = decode(buffer);
    raw.set(m, Buffer.from(buffer));
    return m;
  };
  const container = rhea.create_container({ id: 'prove-wire' });
  const connect = (options = {}) => new Promise((resolve, reject) => {
    const conn = container.connect({ host: '127.0.0.1', port, reconnect: false, ...options });
    conn.once('connection_open', () => resolve(conn));
    conn.once('connection_error', (ctx) => reject(new Error(`connection error: ${ctx.connection.error?.description}`)));
    conn.once('disconnected', (ctx) => reject(new Error(`disconnected: ${ctx.error?.message ?? ''}`)));
  });
  const opened = (link) => new Promise((resolve) => {
    link.once(link.is_sender() ? 'sender_open' : 'receiver_open', () => resolve(link));
    link.once(link.is_sender() ? 'sender_close' : 'receiver_close', () => resolve(link));
  });
  const messages = (receiver) => {
    const got = [];
    receiver.on('message', (ctx) => got.push({ message: ctx.message, bytes: raw.get(ctx.message) }));
    return got;
  };
  const closed = (link) => new Promise((resolve) => link.once(link.is_sender() ? 'sender_close' : 'receiver_close', () => resolve(link)));

  const conn = await connect();
  try {
    // $management: reply on the reply link, correlated by message id, typed as the service types it.
    const replies = conn.open_receiver({ source: { address: '$management' }, target: { address: 'prove-reply' }, name: 'prove-reply' });
    const got = messages(replies);
    const requests = conn.open_sender({ target: { address: '$management' } });
    await Promise.all([opened(replies), opened(requests)]);

    // Every field of the performatives (rhea leaves trailing ones out, which azure-eventhub's
    // Python stack cannot read), and the service's OPEN and BEGIN limits.
    const fields = (composite) => composite?.value?.length;
    const open = conn.remote.open;
    check(fields(open) === 10 && open.max_frame_size === 65536 && open.channel_max === 4999,
      'wire: OPEN with all 10 fields, max-frame-size 65536, channel-max 4999', `${fields(open)} ${open.max_frame_size} ${open.channel_max}`);
    const begin = replies.session.remote.begin;
    check(fields(begin) === 8 && begin.handle_max === 255, 'wire: BEGIN with all 8 fields, handle-max 255', `${fields(begin)} ${begin.handle_max}`);
    const att = replies.remote.attach;
    const terminus = (t) => t?.value?.length;
    check(fields(att) === 14 && terminus(att.value[5]) === 11 && terminus(att.value[6]) === 7 && fields(requests.remote.attach) === 14,
      'wire: ATTACH with all 14 fields, its source with 11 and target with 7', `${fields(att)} ${terminus(att.value[5])} ${terminus(att.value[6])}`);
    requests.send({ message_id: 'req-1', reply_to: 'prove-reply', application_properties: { operation: 'READ', name: WIRE_HUB, type: 'com.microsoft:eventhub' }, body: Buffer.from('[]') });
    await waitFor(() => got.length >= 1, 5000);
    const rep = got[0];
    const s = rep && sectionsOf(rep.bytes);
    const app = typedMap(s?.[0x74]);
    const body = typedMap(s?.[0x77]);
    check(rep?.message.correlation_id === 'req-1', 'wire: a management reply carries correlation-id = the request\'s message-id');
    check(/Int$/.test(app['status-code']?.type) && app['status-code'].value === 200, 'wire: status-code 200 is an int', app['status-code']?.type);
    check(/^Array/.test(body.partition_ids?.type) && body.partition_ids.typed.value.every((v) => v.type.name === 'Str8') &&
      body.partition_ids.typed.value.map((v) => v.value).join(',') === '0,1,2,3', 'wire: partition_ids is an AMQP array of strings', body.partition_ids?.type);
    check(/Int$/.test(body.partition_count?.type) && body.created_at?.type === 'Timestamp', 'wire: partition_count an int, created_at a timestamp');

    // A message with types rhea would not choose by itself: kept as sent.
    const send = conn.open_sender({ target: { address: `${WIRE_HUB}/Partitions/3` } });
    await opened(send);
    check(send.remote.attach.max_message_size === 1024 * 1024, 'wire: a send link is told max-message-size 1 MiB', String(send.remote.attach.max_message_size));
    const uuid = Buffer.from('00112233445566778899aabbccddeeff', 'hex');
    const accepted = new Promise((resolve) => send.once('accepted', resolve));
    send.send({
      message_id: rhea.types.wrap_uuid(uuid),
      application_properties: { big: rhea.types.wrap_long(7), tiny: rhea.types.wrap_ubyte(3), at: new Date(1700000000000) },
      message_annotations: { 'x-user': 'u', 'x-opt-sequence-number': rhea.types.wrap_long(99) },
      body: rhea.message.data_section(Buffer.from('{"hello":1}')),
    });
    await accepted;
    const rx = conn.open_receiver({ source: { address: `${WIRE_HUB}/ConsumerGroups/$Default/Partitions/3` } });
    const events = messages(rx);
    await opened(rx);
    await waitFor(() => events.length >= 1, 5000);
    const ev = events[0] && sectionsOf(events[0].bytes);
    const ann = typedMap(ev?.[0x72]);
    const evApp = typedMap(ev?.[0x74]);
    check(ann['x-opt-sequence-number']?.type === 'SmallLong' || ann['x-opt-sequence-number']?.type === 'Long', 'wire: x-opt-sequence-number is a long (and the sender\'s own value is not kept)', `${ann['x-opt-sequence-number']?.type} ${ann['x-opt-sequence-number']?.value}`);
    check(ann['x-opt-sequence-number']?.value === 0, '... and it is the assigned one', String(ann['x-opt-sequence-number']?.value));
    check(/^Str/.test(ann['x-opt-offset']?.type), 'wire: x-opt-offset is a string', ann['x-opt-offset']?.type);
    check(ann['x-opt-enqueued-time']?.type === 'Timestamp', 'wire: x-opt-enqueued-time is a timestamp', ann['x-opt-enqueued-time']?.type);
    check(ann['x-user']?.value === 'u', 'wire: the sender\'s own message annotations are kept');
    check(/Long$/.test(evApp.big?.type) && evApp.tiny?.type === 'Ubyte' && evApp.at?.type === 'Timestamp', 'wire: application property types are kept (long, ubyte, timestamp)',
      `${evApp.big?.type} ${evApp.tiny?.type} ${evApp.at?.type}`);
    check(ev?.[0x73]?.value[0]?.type.name === 'Uuid' && ev[0x73].value[0].value.equals(uuid), 'wire: a uuid message-id stays a uuid', ev?.[0x73]?.value[0]?.type.name);
    check(ev?.[0x75]?.[0]?.value.toString() === '{"hello":1}', 'wire: the body (a data section) is kept');

    // The selector filter's other spellings; its echo in the attach.
    await send.send({ body: 'second' });
    await send.send({ body: 'third' });
    await sleep(200);
    const filtered = async (text, descriptor) => {
      const l = conn.open_receiver({ source: { address: `${WIRE_HUB}/ConsumerGroups/$Default/Partitions/3`, filter: { [SELECTOR]: rhea.types.wrap_described(text, descriptor) } } });
      const m = messages(l);
      await opened(l);
      await sleep(300);
      l.close();
      return { link: l, seqs: m.map((x) => x.message.message_annotations['x-opt-sequence-number']).join(',') };
    };
    let t = await filtered('amqp.annotation.x-opt-sequence-number>0', SELECTOR);
    check(t.seqs === '1,2', 'wire: filter with no spaces and an unquoted number', t.seqs);
    const echoed = t.link.remote.attach.source?.filter?.[SELECTOR];
    check(String(echoed?.value ?? echoed) === 'amqp.annotation.x-opt-sequence-number>0', 'wire: the filter is echoed in the attach', JSON.stringify(echoed));
    t = await filtered("amqp.annotation.x-opt-offset >= '0'", 0x468c00000004);
    check(t.seqs === '0,1,2', 'wire: filter described by its numeric code; offset >= 0', t.seqs);
    t = await filtered("amqp.annotation.x-opt-sequence-number > '-1'", SELECTOR);
    check(t.seqs === '0,1,2', 'wire: sequence number > -1 is the start', t.seqs);
    const bad = conn.open_receiver({ source: { address: `${WIRE_HUB}/ConsumerGroups/$Default/Partitions/3`, filter: { [SELECTOR]: rhea.types.wrap_described('x-opt-offset < 3', SELECTOR) } } });
    await closed(bad);
    check(bad.error?.condition === 'amqp:invalid-field', 'wire: an unknown filter is refused', bad.error?.condition);
    check(fields(bad.remote.detach) === 3 && fields(bad.remote.detach.value[2]) === 3, 'wire: DETACH with all 3 fields, its error with 3',
      `${fields(bad.remote.detach)} ${fields(bad.remote.detach.value[2])}`);

    // A non-closing detach is answered with a non-closing one (Rust's SDK detaches so, and would
    // re-attach on a closing answer), and the receiver is gone: a lower owner level attaches after.
    const owner = conn.open_receiver({ source: { address: `${WIRE_HUB}/ConsumerGroups/$Default/Partitions/2` }, properties: { 'com.microsoft:epoch': rhea.types.wrap_long(5) } });
    await opened(owner);
    const detached = closed(owner);
    owner.detach();
    await detached;
    check(owner.remote.detach?.closed === false, 'wire: detach with closed=false is answered with closed=false', String(owner.remote.detach?.closed));
    const next = conn.open_receiver({ source: { address: `${WIRE_HUB}/ConsumerGroups/$Default/Partitions/2` }, properties: { 'com.microsoft:epoch': rhea.types.wrap_long(1) } });
    await opened(next);
    await sleep(200);
    check(next.is_open() && !next.error, 'wire: a detached owner no longer holds its partition');
    const done = closed(next);
    next.close();
    await done;
    check(next.remote.detach?.closed === true, 'wire: detach with closed=true is answered with closed=true');
  } finally {
    conn.close();
  }

  // SASL PLAIN (rhea offers it when given a user name and password), and a clean close.
  const plain = await connect({ username: 'user', password: 'secret' }).catch((e) => e);
  check(!(plain instanceof Error), 'wire: SASL PLAIN is accepted', plain instanceof Error ? plain.message : '');
  if (!(plain instanceof Error)) {
    const bye = new Promise((resolve) => plain.once('connection_close', () => resolve(true)));
    plain.close();
    check(await Promise.race([bye, sleep(3000).then(() => false)]), 'wire: close is answered');
  }
  rhea.message.decode = decode;
}
