"""The official `openai` client's embeddings call against `edgelm serve --http` (it asks for
base64 unless told otherwise). Usage: openai_embeddings.py BASE_URL TEXT...
Prints the embeddings as JSON lists of floats, as the client decoded them."""
import json
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="not-needed", max_retries=0, timeout=120)
model = client.models.list().data[0].id
r = client.embeddings.create(model=model, input=sys.argv[2:])
print(json.dumps([d.embedding for d in r.data]))
