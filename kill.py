import json, os, signal
e = [json.loads(l) for l in open('/tmp/r4/run/events.jsonl') if 'workers' in l][-1]
os.kill(e['ranks'][1]['pid'], getattr(signal, os.environ.get('SIG', 'SIGKILL')))
