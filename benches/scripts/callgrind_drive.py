import http.client, json, os, sys
host, port, n, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
# A debug credential (callgrind_run.sh ... trace): every request is traced.
extra = {"apim-debug-authorization": os.environ["TRACE_TOKEN"]} if os.environ.get("TRACE_TOKEN") else {}
body = json.dumps({"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 16, "stream": mode == "stream"}).encode()
c = http.client.HTTPConnection(host, port, timeout=30)
for _ in range(n):
    c.request("POST", "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21", body=body,
              headers={"api-key": "cg-key-0123456789", "content-type": "application/json", **extra})
    r = c.getresponse(); r.read()
    assert r.status == 200, r.status
    assert not extra or r.getheader("apim-trace-id"), "not traced"
