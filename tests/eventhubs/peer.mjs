// An Event Hubs-shaped AMQP 1.0 peer for iomt-connector's tests: there is no Event Hubs emulator to
// install here, so the tests talk to this instead. It speaks what Microsoft's clients need of the
// service (learned by running them against it; prove.mjs runs @azure/event-hubs against it, and
// prove.py azure-eventhub, Microsoft's Python client, whose AMQP stack is its own, not rhea):
//
//   * every field of every performative (OPEN, BEGIN, ATTACH, FLOW, TRANSFER, ...) and of the
//     composites in them, as the service sends them: rhea leaves trailing null fields out (AMQP
//     allows it), and the Python client cannot read that (see "full field lists" below); the
//     service's OPEN limits (max-frame-size 65536, channel-max 4999) and BEGIN handle-max 255;
//   * plain TCP on 127.0.0.1, SASL ANONYMOUS (and PLAIN, any credentials);
//   * $cbs put-token: answered 202, any token accepted;
//   * $management READ of com.microsoft:eventhub and com.microsoft:partition;
//   * send links to <hub> (partition by x-opt-partition-key, else round robin) and
//     <hub>/Partitions/<p>; batches (message format 0x80013700) unpacked into their events;
//   * receive links on <hub>/ConsumerGroups/<cg>/Partitions/<p> with the selector filter
//     (offset, sequence number or enqueued time, > or >=, '@latest', '-1'), echoed in the attach;
//     the stored events from there, then new ones as they arrive;
//   * owner levels (link property com.microsoft:epoch) per hub, consumer group and partition.
//
// Hubs are made on first use with --partitions partitions. Each partition is an append-only
// JSON-lines file under --data, so a restarted peer serves the same events at the same offsets and
// sequence numbers.
//
//   node peer.mjs --data DIR [--port 5673] [--partitions 4] [--ready-file FILE]
//
// Prints `listening on 127.0.0.1:PORT` once it listens (--port 0 picks a free port), and then
// writes that address to --ready-file, if given (the file is removed at start and on SIGTERM/INT).

import rhea from 'rhea';
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { createRequire } from 'node:module';

const USAGE = 'usage: node peer.mjs --data DIR [--port 5673] [--partitions 4] [--ready-file FILE]';
let opts;
try {
  opts = parseArgs({
    options: {
      port: { type: 'string', default: '5673' },
      data: { type: 'string' },
      partitions: { type: 'string', default: '4' },
      'ready-file': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  }).values;
} catch (err) {
  console.error(`${err.message}\n${USAGE}`);
  process.exit(2);
}
if (opts.help) {
  console.log(USAGE);
  process.exit(0);
}
const PORT = Number(opts.port);
const DATA = opts.data;
const PARTITIONS = Number(opts.partitions);
const READY_FILE = opts['ready-file'];
if (!DATA || !Number.isInteger(PORT) || PORT < 0 || !Number.isInteger(PARTITIONS) || PARTITIONS < 1) {
  console.error(USAGE);
  process.exit(2);
}
if (PORT === 5672) {
  // 5672 belongs to the RabbitMQ the other tests use; a peer there would hide or break it.
  console.error('refusing port 5672 (RabbitMQ\'s); the default is 5673');
  process.exit(2);
}
fs.mkdirSync(DATA, { recursive: true });
if (READY_FILE) fs.rmSync(READY_FILE, { force: true });

const types = rhea.types;
const BATCH_FORMAT = 0x80013700; // Microsoft's "batched message" format: data sections = messages
const SELECTOR = 'apache.org:selector-filter:string';
const MAX_MESSAGE_SIZE = 1024 * 1024;
// The annotations the service assigns; a sender's own values for them are not kept (except the
// partition key, which the service takes from the sender).
const SYSTEM = new Set(['x-opt-sequence-number', 'x-opt-offset', 'x-opt-enqueued-time', 'x-opt-partition-key']);

// The peer stores (and later delivers) a sender's sections byte for byte, so that every AMQP type
// the sender chose survives: decoding and re-encoding with rhea would not keep them (a long
// application property 7 would come back a uint, for one). rhea decodes every format-0 transfer
// before handing it over and keeps no copy of its bytes, so its decoder is wrapped to keep them.
const decodeMessage = rhea.message.decode;
rhea.message.decode = (buffer) => {
  const m = decodeMessage(buffer);
  Object.defineProperty(m, 'encoded', { value: Buffer.from(buffer), enumerable: false });
  return m;
};

// ------------------------------------------------------------------------------------ full field lists

// AMQP 1.0 lets an encoder leave out a composite's trailing null fields (part 1, 1.4), and rhea
// does: its OPEN, BEGIN, ATTACH, FLOW, TRANSFER, ... stop at the last field it set. The service
// sends every field, and some clients rely on it: the pure-Python AMQP stack of Microsoft's
// azure-eventhub (5.15) reads performatives by index (frame[9], a TRANSFER's payload at
// frame[11]) and fails with "list index out of range" on the first OPEN otherwise. rhea has no
// option for it, so every frame the peer writes is passed through fullFields(): the performative
// and the AMQP composites in its fields (source, target, error, delivery states) are padded with
// nulls to their full length, which means the same thing to every reader (a null field is an
// absent one). Messages (a TRANSFER's payload) are not touched: they are delivered as stored.
//
// The number of fields of each composite, by descriptor code (AMQP 1.0, parts 2, 3 and 5).
const FIELDS = {
  0x10: 10, 0x11: 8, 0x12: 14, 0x13: 11, 0x14: 11, 0x15: 6, 0x16: 3, 0x17: 1, 0x18: 1, // open .. close
  0x1d: 3, // error
  0x23: 2, 0x24: 0, 0x25: 1, 0x26: 0, 0x27: 3, // received, accepted, rejected, released, modified
  0x28: 11, 0x29: 7, // source, target
  0x40: 1, 0x41: 3, 0x42: 1, 0x43: 1, 0x44: 2, // sasl-mechanisms, -init, -challenge, -response, -outcome
};

// Values the service sends where rhea sends none and offers no option: a BEGIN's handle-max (the
// service's is 255, as a frame trace in https://github.com/vcabbage/amqp/issues/56 shows). The
// Python stack compares it with its count of links, and a null one fails. (The OPEN's values are
// rhea options: see container.listen below.)
const SERVICE_VALUES = { 0x11: { 4: types.wrap_uint(255) } };

/** A described list with all its fields (a new value; null when `t` is no AMQP composite). */
function padded(t) {
  const code = t?.descriptor?.value;
  const n = typeof code === 'number' ? FIELDS[code] : undefined;
  if (n === undefined || !Array.isArray(t.value) || !t.type?.name?.startsWith('List')) return null;
  const items = t.value.map((x) => padded(x) ?? x ?? types.Null());
  while (items.length < n) items.push(types.Null());
  for (const [i, v] of Object.entries(SERVICE_VALUES[code] ?? {})) {
    if (items[i].type?.name === 'Null') items[i] = v;
  }
  return types.described(types.wrap_ulong(code), items.length ? types.List32(items) : types.List0());
}

function fullFields(performative) {
  const t = performative?.described ? performative.described() : performative;
  return padded(t) ?? performative;
}

// rhea's frames module (the one its connections use: the same file, so the same module instance).
const rheaFrames = createRequire(import.meta.url)('rhea/lib/frames.js');
const writeFrame = rheaFrames.write_frame;
rheaFrames.write_frame = (frame) => writeFrame(frame.performative ? { ...frame, performative: fullFields(frame.performative) } : frame);

// ------------------------------------------------------------------------------------ sections

const SECTION_NAMES = {
  0x70: 'header', 0x71: 'delivery_annotations', 0x72: 'message_annotations', 0x73: 'properties',
  0x74: 'application_properties', 0x75: 'data', 0x76: 'sequence', 0x77: 'value', 0x78: 'footer',
  'amqp:header:list': 'header', 'amqp:delivery-annotations:map': 'delivery_annotations',
  'amqp:message-annotations:map': 'message_annotations', 'amqp:properties:list': 'properties',
  'amqp:application-properties:map': 'application_properties', 'amqp:data:binary': 'data',
  'amqp:amqp-sequence:list': 'sequence', 'amqp:value:*': 'value', 'amqp:footer:map': 'footer',
};

/** An encoded message's sections, each with its exact bytes and its typed (undecoded) value. */
function sections(buffer) {
  const reader = new types.Reader(buffer);
  const out = [];
  while (reader.remaining()) {
    const start = reader.position;
    const typed = reader.read();
    const name = SECTION_NAMES[typed.descriptor?.value];
    if (!name) throw new Error(`not an AMQP message section at byte ${start}`);
    out.push({ name, typed, bytes: buffer.subarray(start, reader.position) });
  }
  return out;
}

/** The key/value Typed pairs of a map section, as [[key, value], ...]. */
function entries(section) {
  const items = section?.typed.value ?? [];
  const pairs = [];
  for (let i = 0; i + 1 < items.length; i += 2) pairs.push([items[i], items[i + 1]]);
  return pairs;
}

function writeSection(code, typed) {
  const w = new types.Writer();
  w.write(types.described(types.wrap_ulong(code), typed));
  return w.toBuffer();
}

/**
 * What is kept of a sent message: its sections as sent, less the delivery annotations (they are
 * for one hop) and less the system annotations a sender may have put in the message annotations.
 * Returns the bytes and the partition key the message carried, if any.
 */
function keep(buffer) {
  const kept = [];
  let key = null;
  for (const s of sections(buffer)) {
    if (s.name === 'delivery_annotations') continue;
    if (s.name === 'message_annotations') {
      const user = [];
      for (const [k, v] of entries(s)) {
        if (k.value === 'x-opt-partition-key' && v.value != null) key = String(v.value);
        if (!SYSTEM.has(k.value)) user.push(k, v);
      }
      if (user.length) kept.push(writeSection(0x72, types.Map32(user)));
      continue;
    }
    kept.push(s.bytes);
  }
  return { encoded: Buffer.concat(kept), key };
}

/**
 * The bytes delivered for a stored event: its own sections, with the message annotations section
 * (the user's ones plus the four x-opt-* the service adds) in the place AMQP orders it (after the
 * header, before the properties).
 */
function delivery(e) {
  const parts = sections(e.encoded);
  const user = parts.find((s) => s.name === 'message_annotations');
  const items = entries(user).filter(([k]) => !SYSTEM.has(k.value)).flat();
  items.push(
    types.wrap_symbol('x-opt-sequence-number'), types.wrap_long(e.seq),
    // Always a string: the service sends it so, and clients (Rust's, the JS one) read it as such.
    types.wrap_symbol('x-opt-offset'), types.wrap_string(e.offset),
    types.wrap_symbol('x-opt-enqueued-time'), types.wrap_timestamp(e.enq),
  );
  if (e.key != null) items.push(types.wrap_symbol('x-opt-partition-key'), types.wrap_string(e.key));
  const header = parts.filter((s) => s.name === 'header').map((s) => s.bytes);
  const rest = parts.filter((s) => s.name !== 'header' && s.name !== 'message_annotations').map((s) => s.bytes);
  return Buffer.concat([...header, writeSection(0x72, types.Map32(items)), ...rest]);
}

/** A JSON-friendly view of a decoded value (for the data files, which people read too). */
function plain(v) {
  if (v == null) return v ?? null;
  if (Buffer.isBuffer(v)) return { binary: v.toString('base64') };
  if (v instanceof Date) return { timestamp: v.toISOString() };
  if (typeof v === 'bigint') return v.toString();
  if (Array.isArray(v)) return v.map(plain);
  if (typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plain(x)]));
  return v;
}

/** The readable part of a stored record: the message's sections, decoded. */
function readable(encoded) {
  const m = decodeMessage(encoded);
  const props = {};
  for (const f of ['message_id', 'user_id', 'to', 'subject', 'reply_to', 'correlation_id', 'content_type',
    'content_encoding', 'absolute_expiry_time', 'creation_time', 'group_id', 'group_sequence', 'reply_to_group_id']) {
    if (m[f] !== undefined) props[f] = plain(m[f]);
  }
  const out = {
    properties: props,
    application_properties: plain(m.application_properties ?? {}),
    message_annotations: plain(m.message_annotations ?? {}),
  };
  const body = m.body;
  if (body?.typecode === 0x75) {
    // data sections: the bytes, base64, one entry per section
    out.body = (body.multiple ? body.content : [body.content]).map((b) => Buffer.from(b).toString('base64'));
  } else if (body !== undefined) {
    out.body_value = plain(body?.content ?? body);
  }
  return out;
}

// ------------------------------------------------------------------------------------ storage

/**
 * hub name -> { name, created, count, next, partitions: [{ events, file, nextOffset }] }.
 * In memory each event is { seq, offset, enq, key, encoded } (encoded: the kept sections).
 */
const hubs = new Map();

/** Reads one partition file; a torn last line (the peer killed mid-write) is cut off. */
function load(file) {
  if (!fs.existsSync(file)) return [];
  let text = fs.readFileSync(file, 'utf8');
  const end = text.lastIndexOf('\n') + 1;
  if (end < text.length) {
    fs.truncateSync(file, Buffer.byteLength(text.slice(0, end)));
    text = text.slice(0, end);
  }
  return text.split('\n').filter(Boolean).map((line) => {
    const r = JSON.parse(line);
    // (seq, enq, key and raw: the names an earlier version of this peer wrote)
    return {
      seq: r.sequence_number ?? r.seq,
      offset: String(r.offset),
      enq: r.enqueued_time_ms ?? r.enq,
      key: r.partition_key ?? r.key ?? null,
      encoded: Buffer.from(r.amqp ?? r.raw, 'base64'),
    };
  });
}

function hub(name) {
  let h = hubs.get(name);
  if (h) return h;
  const dir = path.join(DATA, encodeURIComponent(name));
  fs.mkdirSync(dir, { recursive: true });
  // A hub's creation time and partition count are its own: kept beside its partitions, so that a
  // restart (even with another --partitions) describes the same hub.
  const metaFile = path.join(dir, 'hub.json');
  let meta;
  if (fs.existsSync(metaFile)) {
    meta = JSON.parse(fs.readFileSync(metaFile, 'utf8'));
  } else {
    meta = { name, created_at_ms: Date.now(), partition_count: PARTITIONS };
    fs.writeFileSync(metaFile, JSON.stringify(meta) + '\n');
  }
  const partitions = [];
  for (let p = 0; p < meta.partition_count; p++) {
    const file = path.join(dir, `${p}.jsonl`);
    const events = load(file);
    const last = events[events.length - 1];
    partitions.push({ events, file, nextOffset: last ? BigInt(last.offset) + BigInt(last.encoded.length) : 0n });
  }
  h = { name, created: meta.created_at_ms, count: meta.partition_count, partitions, next: 0 };
  hubs.set(name, h);
  return h;
}

/**
 * Appends events to a partition: one file write for the lot (a batch lands whole or, if the peer
 * is killed mid-write, loses its torn tail only), then wakes that partition's readers.
 *
 * The offset is the event's byte position in the partition (the kept sizes of the events before
 * it), as text: opaque to clients, as the service's is, and unlike the sequence number from the
 * second event on, so that a client that confuses the two is caught.
 */
function append(h, p, items) {
  const part = h.partitions[p];
  const lines = [];
  for (const { encoded, key } of items) {
    const last = part.events[part.events.length - 1];
    // Enqueued times never go backwards within a partition: the enqueued-time filter relies on it.
    const e = { seq: part.events.length, offset: String(part.nextOffset), enq: Math.max(Date.now(), last?.enq ?? 0), key, encoded };
    part.nextOffset += BigInt(encoded.length);
    part.events.push(e);
    lines.push(JSON.stringify({
      sequence_number: e.seq,
      offset: e.offset,
      enqueued_time_ms: e.enq,
      enqueued_time: new Date(e.enq).toISOString(),
      partition_key: key,
      ...readable(encoded),
      // The message exactly as kept (what is delivered): the fields above are for reading only.
      amqp: encoded.toString('base64'),
    }));
  }
  fs.appendFileSync(part.file, lines.join('\n') + '\n');
  for (const s of readers.get(`${h.name}|${p}`) ?? []) pump(s);
}

// Java's String.hashCode: any stable hash does; one device id always lands on the same partition.
function partitionFor(h, key) {
  if (key == null) return h.next++ % h.count;
  let x = 0;
  for (const c of String(key)) x = (Math.imul(31, x) + c.codePointAt(0)) | 0;
  return Math.abs(x) % h.count;
}

// ------------------------------------------------------------------------------------ receive links

/** `${hub}|${p}` -> Set of the peer's sender links on that partition (clients' receivers). */
const readers = new Map();
/** `${hub}|${p}|${consumer group}` -> Set of the same links, for owner levels. */
const owners = new Map();

/**
 * The selector filter's text. @azure/event-hubs sends it described by the numeric code, Rust's SDK
 * by the symbol; rhea hands over either a described value or its plain content.
 */
function filterOf(source) {
  const f = source?.filter;
  if (!f || typeof f !== 'object') return null;
  const v = f[SELECTOR] ?? Object.values(f)[0];
  if (v == null) return null;
  if (typeof v === 'string') return { text: v, descriptor: null };
  return { text: String(v.value ?? v), descriptor: v.descriptor ?? null };
}

/**
 * Where a selector filter starts: { next, until } — `next` the sequence number of the first event
 * to look at, `until` (or null) a test that events are skipped for until one passes (offsets,
 * sequence numbers and enqueued times only grow within a partition, so after the first event that
 * passes, all do). That covers positions past the last event too: they wait for later events.
 *
 * Accepted: amqp.annotation.x-opt-offset > '123' (or >=), ...x-opt-sequence-number > 5,
 * ...x-opt-enqueued-time > 1700000000000 (milliseconds since the epoch, compared with the time the
 * peer enqueued each event), quoted or not, with or without spaces; offset '@latest' (only events
 * enqueued from now on) and '-1' (from the start).
 */
function startOf(events, text) {
  if (text == null) return { next: 0, until: null };
  const m = /^\s*amqp\.annotation\.x-opt-(offset|sequence-number|enqueued-time)\s*(>=|>)\s*(?:'([^']*)'|([^\s']+))\s*$/i.exec(text);
  if (!m) throw new Error(`unsupported selector filter: ${text}`);
  const field = m[1].toLowerCase();
  const inclusive = m[2] === '>=';
  const value = (m[3] ?? m[4]).trim();
  if (field === 'offset' && value === '@latest') return { next: events.length, until: null };
  if (!/^-?\d+$/.test(value)) throw new Error(`not a number in the selector filter: ${text}`);
  const n = BigInt(value);
  if (n < 0n) return { next: 0, until: null }; // '-1': from the start
  const of = { offset: (e) => BigInt(e.offset), 'sequence-number': (e) => BigInt(e.seq), 'enqueued-time': (e) => BigInt(e.enq) }[field];
  const until = inclusive ? (e) => of(e) >= n : (e) => of(e) > n;
  const i = events.findIndex(until);
  return i < 0 ? { next: events.length, until } : { next: i, until: null };
}

function pump(sender) {
  const st = sender.eh;
  if (!st || sender.is_closed()) return;
  const events = hubs.get(st.hub).partitions[st.partition].events;
  while (st.next < events.length && sender.sendable()) {
    const e = events[st.next++];
    if (st.until) {
      if (!st.until(e)) continue;
      st.until = null;
    }
    // format 0 with bytes: rhea sends them as they are (an already encoded message)
    sender.send(delivery(e), undefined, 0);
  }
}

/** Refuses a link: it was attached (rhea answers every attach), so it is detached with an error. */
function refuse(link, condition, description) {
  link.close({ condition, description });
}

function openReader(sender, address) {
  const m = /^(?:amqps?:\/\/[^/]+\/)?([^/]+)\/ConsumerGroups\/([^/]+)\/Partitions\/([^/]+)$/i.exec(address);
  if (!m) return refuse(sender, 'amqp:not-found', `no such source: ${address}`);
  const h = hub(decodeURIComponent(m[1]));
  const cg = decodeURIComponent(m[2]).toLowerCase(); // consumer group names are case-insensitive
  const partition = /^\d+$/.test(m[3]) ? Number(m[3]) : -1;
  if (partition < 0 || partition >= h.count) return refuse(sender, 'amqp:not-found', `no partition ${m[3]} in ${h.name}`);

  const attach = sender.remote.attach;
  const filter = filterOf(attach.source);
  // Echo the source, filter included: the service answers with the filter it applied.
  echo(sender, filter);
  let start;
  try {
    start = startOf(h.partitions[partition].events, filter?.text);
  } catch (err) {
    return refuse(sender, 'amqp:invalid-field', err.message);
  }

  // Owner levels (epochs), per hub, consumer group and partition, as the service keeps them: a
  // receiver with an owner level at least the highest present takes the partition, and every
  // other receiver there (with a level or without) is detached with amqp:link:stolen; one below it,
  // or one without a level while a receiver with one is there, is refused the same way.
  const raw = attach.properties?.['com.microsoft:epoch'];
  const epoch = raw == null ? null : Number(raw);
  const key = `${h.name}|${partition}`;
  const ownerKey = `${key}|${cg}`;
  const others = [...(owners.get(ownerKey) ?? [])].filter((s) => !s.is_closed());
  const levels = others.map((s) => s.eh.epoch).filter((x) => x != null);
  const top = levels.length ? Math.max(...levels) : null;
  if (top != null && (epoch == null || epoch < top)) {
    return refuse(sender, 'amqp:link:stolen',
      `a receiver with owner level ${top} holds partition ${partition} of ${h.name} for consumer group ${cg}; ` +
      (epoch == null ? 'a receiver without one' : `owner level ${epoch}`) + ' is refused');
  }
  if (epoch != null) {
    for (const s of others) {
      forget(s);
      s.close({ condition: 'amqp:link:stolen', description: `a receiver with owner level ${epoch} took partition ${partition} of ${h.name} for consumer group ${cg}` });
    }
  }

  sender.eh = { hub: h.name, partition, epoch, next: start.next, until: start.until };
  if (!readers.has(key)) readers.set(key, new Set());
  readers.get(key).add(sender);
  if (!owners.has(ownerKey)) owners.set(ownerKey, new Set());
  owners.get(ownerKey).add(sender);
  setImmediate(() => pump(sender));
}

/** Answers an attach with the client's own source and target (and its selector filter, if any). */
function echo(link, filter) {
  const source = { ...(link.remote.attach.source ?? {}) };
  delete source.filter;
  if (filter != null) {
    // Described by the descriptor the client used (the symbol or its numeric code).
    const d = filter.descriptor;
    const descriptor = typeof d?.value === 'string' ? types.wrap_symbol(d.value)
      : d != null ? types.wrap_ulong(Number(d.value ?? d)) : types.wrap_symbol(SELECTOR);
    source.filter = { [SELECTOR]: types.described(descriptor, types.wrap_string(filter.text)) };
  }
  link.set_source(source);
  link.set_target(link.remote.attach.target ?? {});
}

function forget(link) {
  if (!link.eh) return;
  for (const m of [readers, owners]) for (const set of m.values()) set.delete(link);
}

// ------------------------------------------------------------------------------------ $cbs, $management

/**
 * Answers a request on $cbs or $management. The reply goes out on the link the client attached to
 * receive it — source = the node, target = the request's reply-to — with correlation-id = the
 * request's message-id (both Microsoft clients match replies so).
 */
function reply(context, request, status, body, description) {
  const conn = context.connection;
  const node = context.receiver.remote.attach.target?.address;
  const candidates = [...(conn.eh_replies?.get(node) ?? [])].filter((l) => !l.is_closed());
  const link = candidates.find((l) => l.remote.attach.target?.address === request.reply_to) ?? candidates[0];
  if (!link) {
    console.error(`peer: no reply link for ${node} (reply-to ${request.reply_to})`);
    return;
  }
  link.send({
    correlation_id: request.message_id ?? request.correlation_id,
    to: request.reply_to,
    application_properties: { 'status-code': types.wrap_int(status), 'status-description': description },
    body,
  });
}

function onCbs(context, m) {
  // Any token for any audience: the peer checks nobody (SAS and Entra tokens alike).
  reply(context, m, 202, undefined, 'Accepted');
}

function onManagement(context, m) {
  const a = m.application_properties ?? {};
  if (a.operation !== 'READ') return reply(context, m, 501, undefined, `unsupported operation ${a.operation}`);
  if (!a.name) return reply(context, m, 400, undefined, 'no entity name');
  const h = hub(String(a.name));
  if (a.type === 'com.microsoft:eventhub') {
    return reply(context, m, 200, {
      name: h.name,
      type: 'com.microsoft:eventhub',
      created_at: new Date(h.created),
      partition_count: types.wrap_int(h.count),
      // An AMQP array of strings (0xa1 = str8-utf8), not a list: Rust's SDK accepts an array only.
      partition_ids: types.wrap_array(h.partitions.map((_, i) => String(i)), 0xa1),
    }, 'OK');
  }
  if (a.type === 'com.microsoft:partition') {
    const p = /^\d+$/.test(String(a.partition)) ? Number(a.partition) : -1;
    const part = h.partitions[p];
    if (!part) return reply(context, m, 404, undefined, `no partition ${a.partition} in ${h.name}`);
    const last = part.events[part.events.length - 1];
    return reply(context, m, 200, {
      name: h.name,
      type: 'com.microsoft:partition',
      partition: String(p),
      begin_sequence_number: types.wrap_long(0),
      last_enqueued_sequence_number: types.wrap_long(last ? last.seq : -1),
      last_enqueued_offset: last ? last.offset : '-1',
      last_enqueued_time_utc: new Date(last ? last.enq : 0),
      is_partition_empty: !last,
      last_enqueued_sequence_number_epoch: types.wrap_long(0),
    }, 'OK');
  }
  return reply(context, m, 400, undefined, `unsupported type ${a.type}`);
}

// ------------------------------------------------------------------------------------ sends

/**
 * The events one transfer carries, each { encoded, key }. A batch (format 0x80013700) is an
 * envelope whose data sections are each a whole encoded message; its own partition key (in its
 * message annotations) applies to events that carry none. rhea hands a transfer of a format other
 * than 0 over as bytes.
 */
function unpack(context) {
  if (context.delivery.format === BATCH_FORMAT) {
    let envelopeKey = null;
    const events = [];
    for (const s of sections(Buffer.from(context.message))) {
      if (s.name === 'message_annotations') {
        for (const [k, v] of entries(s)) if (k.value === 'x-opt-partition-key' && v.value != null) envelopeKey = String(v.value);
      }
      if (s.name === 'data') events.push(keep(Buffer.from(s.typed.value)));
    }
    return events.map((e) => ({ encoded: e.encoded, key: e.key ?? envelopeKey }));
  }
  if (context.delivery.format !== 0) throw new Error(`unsupported message format ${context.delivery.format}`);
  return [keep(context.message.encoded)];
}

function onSend(context, address) {
  const m = /^(?:amqps?:\/\/[^/]+\/)?([^/]+)(?:\/Partitions\/([^/]+))?$/i.exec(address);
  if (!m) return context.delivery.reject({ condition: 'amqp:not-found', description: `no such target: ${address}` });
  const h = hub(decodeURIComponent(m[1]));
  if (m[2] != null && !(/^\d+$/.test(m[2]) && Number(m[2]) < h.count)) {
    return context.delivery.reject({ condition: 'amqp:not-found', description: `no partition ${m[2]} in ${h.name}` });
  }
  let events;
  try {
    events = unpack(context);
  } catch (err) {
    return context.delivery.reject({ condition: 'amqp:decode-error', description: err.message });
  }
  const byPartition = new Map();
  for (const e of events) {
    const p = m[2] != null ? Number(m[2]) : partitionFor(h, e.key);
    if (!byPartition.has(p)) byPartition.set(p, []);
    byPartition.get(p).push(e);
  }
  for (const [p, items] of byPartition) append(h, p, items);
  context.delivery.accept();
}

// ------------------------------------------------------------------------------------ wiring

// Deliveries are settled here, after they are stored (autoaccept would accept them before).
const container = rhea.create_container({ id: 'iomt-eventhubs-test-peer', autoaccept: false });
container.sasl_server_mechanisms.enable_anonymous();
container.sasl_server_mechanisms.enable_plain(() => true);

container.on('sender_open', (context) => {
  const s = context.sender;
  const address = s.remote.attach.source?.address ?? '';
  if (address === '$cbs' || address === '$management') {
    // A client's reply link for that node: remembered per connection, by node.
    echo(s, null);
    const conn = context.connection;
    conn.eh_replies ??= new Map();
    if (!conn.eh_replies.has(address)) conn.eh_replies.set(address, new Set());
    conn.eh_replies.get(address).add(s);
    return;
  }
  openReader(s, address);
});

container.on('receiver_open', (context) => {
  const r = context.receiver;
  echo(r, null);
  // The service announces its largest message; clients size their batches by it.
  r.local.attach.max_message_size = MAX_MESSAGE_SIZE;
});

container.on('message', (context) => {
  const address = context.receiver.remote.attach.target?.address ?? '';
  if (address === '$cbs' || address === '$management') {
    context.delivery.accept();
    return address === '$cbs' ? onCbs(context, context.message) : onManagement(context, context.message);
  }
  onSend(context, address);
});

container.on('sendable', (context) => pump(context.sender));

// A detach is answered in kind. rhea answers every detach with closed=true; to a client's
// non-closing detach (closed=false, which Rust's SDK sends when it drops a receiver) that means
// "closed", and fe2o3-amqp then re-attaches the link only to close it — a re-attach that, with an
// owner level, would take the partition back from its new owner. Answering closed=false here goes
// out first: rhea's own close, a tick later, finds the link already detached.
function onLinkClose(context) {
  const link = context.sender ?? context.receiver;
  if (context.sender) forget(context.sender);
  if (link && link.remote.detach && !link.remote.detach.closed && !link.is_itself_closed()) link.detach();
}
container.on('sender_close', onLinkClose);
container.on('receiver_close', onLinkClose);
// A detach with an error also comes as *_error; handling it keeps rhea from raising it as an error
// of the whole container (the *_close event still follows).
container.on('sender_error', (context) => forget(context.sender));
container.on('receiver_error', () => {});

for (const ev of ['connection_close', 'disconnected']) {
  container.on(ev, (context) => {
    for (const set of [...readers.values(), ...owners.values()]) {
      for (const s of set) if (s.connection === context.connection) set.delete(s);
    }
  });
}
// azure-eventhub 5.15 (Python) detaches its $management links after it ended their session, as it
// closes a client: frames on a channel that is no longer there, which rhea reports as a protocol
// error of the connection (and ends its socket; the client is closing it anyway). Those are left
// unsaid; any other protocol error is printed as rhea prints it.
container.on('session_close', (context) => {
  (context.connection.eh_ended ??= new Set()).add(context.session.remote.channel);
});
container.on('session_open', (context) => context.connection.eh_ended?.delete(context.session.remote.channel));
container.on('connection_open', (context) => {
  const conn = context.connection;
  conn.on('protocol_error', (err) => {
    const m = /^detach received on invalid channel (\d+)$/.exec(err?.message ?? '');
    if (m && conn.eh_ended?.has(Number(m[1]))) return;
    console.error(`[${conn.options.id}] error on read: ${err}`);
  });
});
container.on('error', (err) => console.error('peer error:', err?.stack ?? err));

// The OPEN the service sends names its frame size and channel limit (65536 and 4999, with an
// idle-time-out of 240000 ms: https://github.com/Azure/azure-sdk-for-python/issues/5316), and
// azure-eventhub's Python stack needs the frame size (it compares it, and a null one fails). The
// idle time-out is left out: rhea would then drop a client quiet for twice that, which no test needs.
const server = container.listen({ port: PORT, host: '127.0.0.1', max_frame_size: 65536, channel_max: 4999 });
server.on('listening', () => {
  const address = `127.0.0.1:${server.address().port}`;
  if (READY_FILE) {
    // Written whole, then renamed: whoever waits for the file never reads half of it. Before the
    // line on stdout, so that whoever waits for the line finds the file there too.
    fs.writeFileSync(`${READY_FILE}.tmp`, `${address}\n`);
    fs.renameSync(`${READY_FILE}.tmp`, READY_FILE);
  }
  console.log(`listening on ${address}`);
});
server.on('error', (err) => {
  console.error(`peer: cannot listen on 127.0.0.1:${PORT}: ${err.message}`);
  process.exit(1);
});
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => {
    if (READY_FILE) fs.rmSync(READY_FILE, { force: true });
    process.exit(0);
  });
}
