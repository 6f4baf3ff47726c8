#!/usr/bin/env python3
"""Copies one image of an OCI layout with its layers decompressed (plain tar),
for benchmarks that separate decompression from the rest of an import.
Usage: oci-decompress.py SRC_LAYOUT DST_LAYOUT TAG"""
import gzip
import hashlib
import json
import os
import shutil
import sys

src, dst, tag = sys.argv[1:4]


def blob(layout, digest):
    return os.path.join(layout, "blobs", *digest.split(":"))


def put(data):
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blob(dst, d)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return d, len(data)


index = json.load(open(os.path.join(src, "index.json")))
desc = next(m for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag)
manifest = json.load(open(blob(src, desc["digest"])))
os.makedirs(dst, exist_ok=True)
shutil.copy(os.path.join(src, "oci-layout"), os.path.join(dst, "oci-layout"))
put(open(blob(src, manifest["config"]["digest"]), "rb").read())
for layer in manifest["layers"]:
    if layer["mediaType"].endswith("+gzip"):
        h = hashlib.sha256()
        tmp = os.path.join(dst, "tmp-layer")
        with gzip.open(blob(src, layer["digest"])) as z, open(tmp, "wb") as out:
            while chunk := z.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
        d = "sha256:" + h.hexdigest()
        os.makedirs(os.path.dirname(blob(dst, d)), exist_ok=True)
        os.replace(tmp, blob(dst, d))
        layer.update(mediaType=layer["mediaType"][: -len("+gzip")], digest=d, size=os.path.getsize(blob(dst, d)))
    else:
        d, _ = put(open(blob(src, layer["digest"]), "rb").read())
md, ms = put(json.dumps(manifest).encode())
entry = {"mediaType": desc["mediaType"], "digest": md, "size": ms, "annotations": {"org.opencontainers.image.ref.name": tag}}
json.dump({"schemaVersion": 2, "manifests": [entry]}, open(os.path.join(dst, "index.json"), "w"))
