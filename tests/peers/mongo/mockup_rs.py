"""A scripted two-member MongoDB replica set (primary + secondary) for cellgate's routing tests.

Each member is a MockupDB on a free 127.0.0.1 port. `hello`/`isMaster` get a replica-set
topology document; every other command gets a canned reply naming the member, and one JSON line
on stdout saying which member received it and the `$readPreference` it carried. It stores
nothing: it proves routing, not data. Run with the venv that tests/peers/mongo/install.sh makes:

    .venv/bin/python mockup_rs.py [--set-name rs0]

Stdout protocol (one JSON object per line, flushed):
    {"event": "listening", "set": "rs0", "primary": "127.0.0.1:P", "secondary": "127.0.0.1:S"}
    {"event": "command", "member": "primary"|"secondary", "command": "find", "db": "...",
     "read_preference": {...} | null, "after_cluster_time": bool, "max_time_ms": int | null}
Commands on a collection named "slow" are recorded but never answered.
Stops on SIGTERM/SIGINT or when stdin closes.
"""

import argparse
import datetime
import json
import signal
import sys
import threading

import bson
from mockupdb import MockupDB

# The operation time every write reply carries, so the test can check the token cellgate makes.
OP_TIME = bson.Timestamp(1_700_000_000, 7)

_out = threading.Lock()


def emit(obj):
    with _out:
        sys.stdout.write(json.dumps(obj, default=str) + "\n")
        sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--set-name", default="rs0")
    args = ap.parse_args()

    members = {"primary": MockupDB(port=0), "secondary": MockupDB(port=0)}
    ports = {name: m.run() for name, m in members.items()}
    addr = {name: f"127.0.0.1:{p}" for name, p in ports.items()}
    hosts = [addr["primary"], addr["secondary"]]

    def hello_doc(name):
        now = datetime.datetime.now(datetime.timezone.utc)
        doc = {
            "ok": 1,
            "helloOk": True,
            "setName": args.set_name,
            "setVersion": 1,
            "hosts": hosts,
            "primary": addr["primary"],
            "me": addr[name],
            "isWritablePrimary": name == "primary",
            "ismaster": name == "primary",
            "secondary": name == "secondary",
            "minWireVersion": 0,
            "maxWireVersion": 21,
            "maxBsonObjectSize": 16 * 1024 * 1024,
            "maxMessageSizeBytes": 48_000_000,
            "maxWriteBatchSize": 100_000,
            "logicalSessionTimeoutMinutes": 30,
            # Needed for maxStalenessSeconds: without lastWriteDate the driver cannot compute a
            # secondary's staleness and filters it out.
            "lastWrite": {"lastWriteDate": now, "opTime": {"ts": OP_TIME, "t": bson.Int64(1)}},
            "localTime": now,
        }
        if name == "primary":
            doc["electionId"] = bson.ObjectId("7fffffff0000000000000001")
        return doc

    def handler_for(name):
        def handle(request):
            cmd = (request.command_name or "").lower() if hasattr(request, "command_name") else ""
            if cmd in ("hello", "ismaster"):
                return request.replies(hello_doc(name))
            doc = request.doc if hasattr(request, "doc") else {}
            rc = doc.get("readConcern") or {}
            emit({
                "event": "command",
                "member": name,
                "command": request.command_name,
                "db": doc.get("$db"),
                "read_preference": doc.get("$readPreference"),
                "after_cluster_time": "afterClusterTime" in rc,
                "max_time_ms": doc.get("maxTimeMS"),
            })
            if doc.get(request.command_name) == "slow":
                # Never answered: lets the test see cellgate's deadline (504).
                return False
            ns = f"{doc.get('$db')}.{doc.get(request.command_name)}"
            reply = {"ok": 1, "operationTime": OP_TIME}
            if cmd == "find" and doc.get("find") in ("cellgate_fences", "cellgate_migrations"):
                # cellgate's migration-fence read before writes, and its look for unfinished
                # migrations at start: this set has neither.
                reply["cursor"] = {"id": bson.Int64(0), "ns": ns, "firstBatch": []}
            elif cmd in ("find", "aggregate"):
                # Cursor ids must be Int64 or the Rust driver rejects the reply. `n` makes the
                # aggregate that countDocuments sends read as a count of 1.
                reply["cursor"] = {"id": bson.Int64(0), "ns": ns,
                                   "firstBatch": [{"_id": 1, "member": name, "n": 1}]}
            elif cmd == "insert":
                reply["n"] = len(doc.get("documents", []))
            elif cmd == "update":
                reply["n"] = 1
                reply["nModified"] = 1
            elif cmd == "delete":
                reply["n"] = 1
            return request.replies(reply)
        return handle

    for name, m in members.items():
        m.autoresponds(handler_for(name))

    emit({"event": "listening", "set": args.set_name, "primary": addr["primary"],
          "secondary": addr["secondary"]})

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())

    def watch_stdin():
        # The test holds our stdin open; if it dies without killing us, EOF ends us too.
        try:
            while sys.stdin.read(4096):
                pass
        except Exception:
            pass
        done.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    done.wait()
    for m in members.values():
        m.stop()


if __name__ == "__main__":
    main()
