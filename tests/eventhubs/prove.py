"""Proves the test peer (peer.mjs) against Microsoft's Python client, azure-eventhub (5.15), whose
AMQP stack (pyamqp, pure Python) is not rhea: prove.mjs runs Microsoft's JS client, which is rhea
like the peer, so it cannot catch what only rhea accepts (a performative with its trailing fields
left out, for one, on which this client fails at the first OPEN). With the connector's fe2o3-amqp,
three independent AMQP stacks agree on the peer.

Starts the peer on a free port with a fresh data directory, then checks, with the client's calls:
hub and partition properties; sends (a batch to a partition id, a batch with a partition key,
single events with application and message properties, events to the hub round robin); reading
back from the start (bodies, properties, sequence numbers, offsets); reading from a sequence
number (exclusive, inclusive), an offset (exclusive, inclusive), an enqueued time, the latest
event and a position not reached yet; owner levels (a higher one takes the partition, a lower one
and one without are refused, per consumer group); a restart of the peer on the same data
directory (same events, sequence numbers, offsets and enqueued times; numbering goes on).
One line per check; exits 1 if any failed.

    .services/eventhub-venv/bin/python tests/eventhubs/prove.py    (scripts/setup.sh makes the venv)
"""

import datetime
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

from azure.eventhub import EventData, EventHubConsumerClient, EventHubProducerClient

HERE = os.path.dirname(os.path.abspath(__file__))
HUB = "prove"
RR_HUB = "prove-round-robin"

# The client logs every retry at WARNING and more: the checks below say what matters.
logging.getLogger("azure").setLevel(logging.CRITICAL)

passes = 0
failures = 0


def check(ok, what, detail=""):
    global passes, failures
    print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + str(detail) if detail else ''}", flush=True)
    if ok:
        passes += 1
    else:
        failures += 1
    return ok


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_peer(port, data):
    child = subprocess.Popen(
        ["node", os.path.join(HERE, "peer.mjs"), "--port", str(port), "--data", data, "--partitions", "4"],
        stdout=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 15
    while time.time() < deadline:
        line = child.stdout.readline()
        if not line:
            raise RuntimeError(f"the peer exited with {child.wait()}")
        if f"listening on 127.0.0.1:{port}" in line:
            # keep draining its stdout, so that it never blocks on a full pipe
            threading.Thread(target=lambda: [None for _ in child.stdout], daemon=True).start()
            return child
    child.kill()
    raise RuntimeError("the peer did not start within 15 s")


def stop_peer(child):
    if child.poll() is None:
        child.terminate()
        child.wait(10)


def wait_for(cond, seconds=10.0):
    deadline = time.time() + seconds
    while not cond() and time.time() < deadline:
        time.sleep(0.05)
    return cond()


class Follow:
    """A receive() of one partition on its own client (and thread); keeps what arrives.

    With max_wait_time the client calls on_event with None once that long passed with nothing
    received: `attached()` waits for the first call, so events sent after it reach an attached link.
    """

    def __init__(self, cs, partition, consumer_group="$Default", **kwargs):
        self.got, self.errors, self.calls = [], [], 0
        self.client = EventHubConsumerClient.from_connection_string(cs, consumer_group=consumer_group)

        def on_event(_ctx, event):
            self.calls += 1
            if event is not None:
                self.got.append(event)

        def on_error(_ctx, err):
            self.errors.append(err)

        self.thread = threading.Thread(
            target=self.client.receive,
            kwargs=dict(on_event=on_event, on_error=on_error, partition_id=partition, max_wait_time=1, **kwargs),
            daemon=True,
        )
        self.thread.start()

    def attached(self):
        return wait_for(lambda: self.calls > 0)

    def stop(self):
        self.client.close()
        self.thread.join(10)


def read(cs, partition, count, **kwargs):
    """Reads until `count` events came (or 10 s passed), then a little longer so that any event
    beyond `count` would show."""
    f = Follow(cs, partition, **kwargs)
    wait_for(lambda: len(f.got) >= count or f.errors)
    time.sleep(0.5)
    f.stop()
    return f


def seqs(events):
    return ",".join(str(e.sequence_number) for e in events)


def bodies(events):
    return [json.loads(e.body_as_str()) for e in events]


def text(v):
    return v.decode() if isinstance(v, bytes) else v


def stolen(errors):
    return any("stolen" in str(e).lower() or "owner" in str(e).lower() or type(e).__name__ in ("ConnectionLostError", "OwnershipLostError")
               for e in errors)


def main():
    port = free_port()
    data = tempfile.mkdtemp(prefix="iomt-eh-prove-py-")
    cs = lambda hub: (f"Endpoint=sb://127.0.0.1:{port};SharedAccessKeyName=k;SharedAccessKey=dmFsdWU=;"
                      f"UseDevelopmentEmulator=true;EntityPath={hub}")
    peer = start_peer(port, data)
    producer = EventHubProducerClient.from_connection_string(cs(HUB))
    try:
        # ------------------------------------------------------------ properties
        props = producer.get_eventhub_properties()
        check(props["eventhub_name"] == HUB and props["partition_ids"] == ["0", "1", "2", "3"]
              and isinstance(props["created_at"], datetime.datetime), "hub properties (4 partitions)", props)
        empty = producer.get_partition_properties("2")
        check(empty["is_empty"] is True and empty["last_enqueued_sequence_number"] == -1 and empty["id"] == "2"
              and empty["eventhub_name"] == HUB, "properties of an empty partition", empty)

        # ------------------------------------------------------------ sends
        batch = producer.create_batch(partition_id="0")
        for i in range(3):
            batch.add(EventData(json.dumps({"n": i})))
        producer.send_batch(batch)
        for i in range(3, 5):
            time.sleep(0.005)  # a few ms apart: reading from an enqueued time has a boundary to find
            e = EventData(json.dumps({"n": i}))
            e.properties = {"device": "d-1", "n": i}
            e.message_id, e.correlation_id, e.content_type = f"m-{i}", f"c-{i}", "application/json"
            producer.send_batch([e], partition_id="0")
        keyed = producer.create_batch(partition_key="device-42")
        for i in range(4):
            keyed.add(EventData(json.dumps({"k": i})))
        producer.send_batch(keyed)
        rr = EventHubProducerClient.from_connection_string(cs(RR_HUB))
        rr.send_batch([EventData(json.dumps({"r": r})) for r in range(8)])
        rr_counts = [rr.get_partition_properties(p)["last_enqueued_sequence_number"] + 1 for p in "0123"]
        rr.close()
        check(rr_counts == [2, 2, 2, 2], "events without a partition key go round robin", rr_counts)

        # ------------------------------------------------------------ read back
        per = {}
        for p in "0123":
            n = producer.get_partition_properties(p)["last_enqueued_sequence_number"] + 1
            per[p] = read(cs(HUB), p, n, starting_position="-1").got
        check(sum(len(v) for v in per.values()) == 9, "every partition read from the start: all 9 events",
              " ".join(f"{p}:{len(v)}" for p, v in per.items()))
        p0 = per["0"]
        check([b["n"] for b in bodies(p0)] == [0, 1, 2, 3, 4], "partition 0: bodies in order", bodies(p0))
        check(seqs(p0) == "0,1,2,3,4", "partition 0: sequence numbers from 0", seqs(p0))
        offsets = [e.offset for e in p0]
        check(all(isinstance(o, str) and o.isdigit() for o in offsets) and offsets[0] == "0"
              and all(int(offsets[i]) > int(offsets[i - 1]) and offsets[i] != str(i) for i in range(1, len(offsets))),
              "partition 0: offsets are growing strings (byte positions, not sequence numbers)", offsets)
        check(all(isinstance(e.enqueued_time, datetime.datetime) for e in p0)
              and all(p0[i].enqueued_time >= p0[i - 1].enqueued_time for i in range(1, len(p0))),
              "partition 0: enqueued times never go back")
        e4 = p0[4] if len(p0) > 4 else None
        app = {text(k): v for k, v in (e4.properties if e4 else {}).items()}
        check(app.get("device") in ("d-1", b"d-1") and app.get("n") == 4, "application properties", app)
        check(e4 is not None and text(e4.message_id) == "m-4" and text(e4.correlation_id) == "c-4"
              and text(e4.content_type) == "application/json", "message properties (message id, correlation id, content type)",
              e4 and (e4.message_id, e4.correlation_id, e4.content_type))
        check(all(e.partition_key is None for e in p0), "no partition key where none was sent")
        keyed_parts = [(p, v) for p, v in per.items() if p != "0" and v]
        kp, kev = keyed_parts[0] if keyed_parts else (None, [])
        check(len(keyed_parts) == 1 and len(kev) == 4 and all(text(e.partition_key) == "device-42" for e in kev)
              and [b["k"] for b in bodies(kev)] == [0, 1, 2, 3],
              "a partition key keeps its batch on one partition, the key on each event", f"partition {kp}")
        pp0 = producer.get_partition_properties("0")
        check(pp0["last_enqueued_sequence_number"] == 4 and pp0["last_enqueued_offset"] == offsets[4] and not pp0["is_empty"]
              and pp0["beginning_sequence_number"] == 0 and pp0["last_enqueued_time_utc"] == p0[4].enqueued_time,
              "partition properties match the last event", pp0)

        # ------------------------------------------------------------ start positions
        r = read(cs(HUB), "0", 2, starting_position=2)
        check(seqs(r.got) == "3,4", "from a sequence number, exclusive", seqs(r.got))
        r = read(cs(HUB), "0", 3, starting_position=2, starting_position_inclusive=True)
        check(seqs(r.got) == "2,3,4", "from a sequence number, inclusive", seqs(r.got))
        r = read(cs(HUB), "0", 1, starting_position=offsets[3])
        check(seqs(r.got) == "4", "from an offset, exclusive", seqs(r.got))
        r = read(cs(HUB), "0", 2, starting_position=offsets[3], starting_position_inclusive=True)
        check(seqs(r.got) == "3,4", "from an offset, inclusive", seqs(r.got))
        r = read(cs(HUB), "0", 2, starting_position=p0[2].enqueued_time)
        check(seqs(r.got) == "3,4", "from an enqueued time (events enqueued after it)", seqs(r.got))
        r = read(cs(HUB), "0", 5, starting_position="-1")
        check(seqs(r.got) == "0,1,2,3,4", "from the earliest ('-1')", seqs(r.got))

        f = Follow(cs(HUB), "0", starting_position="@latest")
        f.attached()
        producer.send_batch([EventData(json.dumps({"n": 5}))], partition_id="0")
        wait_for(lambda: len(f.got) >= 1)
        time.sleep(0.3)
        f.stop()
        check(seqs(f.got) == "5" and bodies(f.got) == [{"n": 5}], "from the latest event: only new ones", seqs(f.got))

        f = Follow(cs(HUB), "0", starting_position=6)
        f.attached()
        producer.send_batch([EventData(json.dumps({"n": 6}))], partition_id="0")
        producer.send_batch([EventData(json.dumps({"n": 7}))], partition_id="0")
        wait_for(lambda: len(f.got) >= 1)
        time.sleep(0.3)
        f.stop()
        check(seqs(f.got) == "7", "from a position not reached yet: only what comes after it", seqs(f.got))

        # ------------------------------------------------------------ owner levels
        low = Follow(cs(HUB), kp, starting_position="-1", owner_level=1)
        check(wait_for(lambda: len(low.got) == 4), "a receiver with owner level 1 reads", f"{len(low.got)} events")
        high = Follow(cs(HUB), kp, starting_position="-1", owner_level=2)
        wait_for(lambda: len(high.got) == 4 and low.errors)
        check(len(high.got) == 4 and not high.errors, "a receiver with owner level 2 attaches and reads",
              f"{len(high.got)} events {[str(e) for e in high.errors]}")
        check(stolen(low.errors), "the owner level 1 receiver is cut off (amqp:link:stolen)",
              "; ".join(f"{type(e).__name__}: {str(e).splitlines()[0]}" for e in low.errors[:1]))
        # The cut-off receiver's client tries again by itself, with its level 1: refused, each time.
        lower = Follow(cs(HUB), kp, starting_position="-1", owner_level=1)
        wait_for(lambda: lower.errors, 5)
        check(stolen(lower.errors) and not lower.got, "a lower owner level is refused",
              "; ".join(f"{type(e).__name__}: {str(e).splitlines()[0]}" for e in lower.errors[:1]))
        none = Follow(cs(HUB), kp, starting_position="-1")
        wait_for(lambda: none.errors, 5)
        check(stolen(none.errors) and not none.got,
              "a receiver without an owner level is refused while one with a level holds the partition",
              "; ".join(f"{type(e).__name__}: {str(e).splitlines()[0]}" for e in none.errors[:1]))
        other = Follow(cs(HUB), kp, consumer_group="other-group", starting_position="-1")
        wait_for(lambda: len(other.got) == 4, 5)
        check(len(other.got) == 4 and not other.errors, "owner levels are per consumer group", f"{len(other.got)} events")
        check(not high.errors and len(high.got) == 4, "the owner level 2 receiver keeps the partition throughout",
              f"{len(high.got)} events {[str(e) for e in high.errors]}")
        for s in (low, high, lower, none, other):
            s.stop()

        # ------------------------------------------------------------ restart
        before = read(cs(HUB), "0", 8, starting_position="-1").got
        stop_peer(peer)
        peer = start_peer(port, data)
        after = read(cs(HUB), "0", 8, starting_position="-1").got
        view = lambda l: " ".join(f"{e.sequence_number}@{e.offset}={e.body_as_str()}" for e in l)
        check(len(after) == 8 and view(after) == view(before),
              "a restarted peer serves the same events at the same sequence numbers and offsets", view(after))
        check([e.enqueued_time for e in after] == [e.enqueued_time for e in before], "... with the same enqueued times")
        check(producer.get_eventhub_properties()["created_at"] == props["created_at"], "... and the same hub creation time")
        producer.send_batch([EventData(json.dumps({"n": 8}))], partition_id="0")
        r = read(cs(HUB), "0", 1, starting_position=7)
        check(seqs(r.got) == "8" and len(before) == 8 and int(r.got[0].offset) > int(before[7].offset),
              "numbering goes on after a restart (the producer reconnects by itself)", view(r.got))
    except Exception as err:  # noqa: BLE001 - any failure is a failed check, with its story
        import traceback
        check(False, "unexpected error", traceback.format_exc())
    finally:
        producer.close()
        stop_peer(peer)
        shutil.rmtree(data, ignore_errors=True)
    print(f"{passes} passed, {failures} failed")
    print("the test peer does NOT behave as Microsoft's Python client expects" if failures
          else "the test peer behaves as Microsoft's Python client expects")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
