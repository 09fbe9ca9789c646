#!/bin/sh
# The image's HEALTHCHECK: llmuxd answers /health on the port its config names.
set -e
port=$(/opt/llmuxd/venv/bin/python3 -c '
import json
try:
    print(int(json.load(open("/etc/llmux/config.json")).get("port") or 3000))
except Exception:
    print(3000)
')
exec curl -fsS -o /dev/null --max-time 4 "http://127.0.0.1:$port/health"
