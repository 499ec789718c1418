// Microsoft's own event processor: @azure/event-hubs' EventHubConsumerClient with
// @azure/eventhubs-checkpointstore-blob's BlobCheckpointStore, reading a hub of the test peer
// (peer.mjs) and checkpointing in Azurite. tests/eventhubs.rs runs it before and after the
// connector on one consumer group and one container, to show that they read each other's
// checkpoints (the Azure SDKs' blob layout).
//
//   node processor.mjs --port P --hub H --storage "<connection string>" --container C
//                      [--upto N] [--only 0,1] [--group '$Default']
//
// Processes, on each partition (or only those of --only), the events with a sequence number below
// N (all without --upto), checkpointing each batch's last; stops once every such partition got
// there, and closes (which gives its partitions up). Partitions without a checkpoint start at the
// earliest event. Prints one JSON line: the checkpoints and ownerships the store listed before it
// started, and the events processed ({partition, sequenceNumber, body}).

import { EventHubConsumerClient, earliestEventPosition } from '@azure/event-hubs';
import { BlobCheckpointStore } from '@azure/eventhubs-checkpointstore-blob';
import { ContainerClient } from '@azure/storage-blob';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, a, i, all) => (a.startsWith('--') ? [...pairs, [a.slice(2), all[i + 1]]] : pairs), []),
);
const upto = args.upto === undefined ? Infinity : Number(args.upto);
const group = args.group ?? '$Default';
const cs = `Endpoint=sb://127.0.0.1:${args.port};SharedAccessKeyName=k;SharedAccessKey=dmFsdWU=;UseDevelopmentEmulator=true;EntityPath=${args.hub}`;

const container = new ContainerClient(args.storage, args.container);
await container.createIfNotExists();
const store = new BlobCheckpointStore(container);
// Greedy, every second: the whole hub claimed at once (the default claims a partition per 10 s).
const client = new EventHubConsumerClient(group, cs, store, {
  loadBalancingOptions: { strategy: 'greedy', updateIntervalInMs: 1000, partitionOwnershipExpirationIntervalInMs: 10000 },
});
const ns = client.fullyQualifiedNamespace;
const listed = {
  namespace: ns,
  checkpoints: await store.listCheckpoints(ns, args.hub, group),
  ownerships: await store.listOwnership(ns, args.hub, group),
};

// Where each partition read here is done: its last event below `upto`.
const only = args.only ? args.only.split(',') : await client.getPartitionIds();
const target = {};
for (const p of only) {
  const props = await client.getPartitionProperties(p);
  target[p] = props.isEmpty ? -1 : Math.min(props.lastEnqueuedSequenceNumber, upto - 1);
}
const reached = {};
for (const c of listed.checkpoints) reached[c.partitionId] = c.sequenceNumber;
const done = () => only.every((p) => target[p] < 0 || (reached[p] ?? -1) >= target[p]);

const events = [];
let finish;
const finished = new Promise((resolve) => (finish = resolve));
const subscription = client.subscribe(
  {
    processEvents: async (batch, context) => {
      const p = context.partitionId;
      if (!only.includes(p)) return;
      const mine = batch.filter((e) => e.sequenceNumber < upto);
      for (const e of mine) {
        // The client hands a JSON body over parsed; bytes and text as they are.
        const body =
          typeof e.body === 'string' ? e.body : e.body instanceof Uint8Array ? Buffer.from(e.body).toString('utf8') : JSON.stringify(e.body);
        events.push({ partition: p, sequenceNumber: e.sequenceNumber, body });
      }
      if (mine.length > 0) {
        await context.updateCheckpoint(mine[mine.length - 1]);
        reached[p] = mine[mine.length - 1].sequenceNumber;
      }
      if (done()) finish();
    },
    processError: async (err, context) => {
      console.error(`processor error on partition ${context.partitionId}: ${err.message}`);
    },
  },
  {
    startPosition: earliestEventPosition,
    maxBatchSize: 50,
    maxWaitTimeInSeconds: 1,
  },
);
if (done()) finish();
const timeout = setTimeout(() => {
  console.error(`timed out: reached ${JSON.stringify(reached)} of ${JSON.stringify(target)}`);
  process.exit(2);
}, 60_000);
await finished;
clearTimeout(timeout);
await subscription.close();
await client.close();
console.log(JSON.stringify({ ...listed, events }));
process.exit(0);
