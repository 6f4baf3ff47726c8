#!/bin/sh
# Prints the Debian mirror this machine's apt uses (the first "deb" source),
# so scripts never hard-code a mirror's host name.
set -eu
for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    uri=$(awk '/^URIs:/ {print $2; exit}' "$f")
    suite=$(awk '/^Suites:/ {print $2; exit}' "$f")
    case "$uri" in *security*) continue ;; esac
    [ -n "$uri" ] && { echo "$uri"; exit 0; }
done
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    uri=$(awk '$1 == "deb" && $2 !~ /security/ { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; exit } }' "$f")
    [ -n "$uri" ] && { echo "$uri"; exit 0; }
done
echo "no Debian mirror found in the apt configuration" >&2
exit 1
