"""Renders chat templates as transformers' apply_chat_template does, the reference edgelm's
renderer is compared with: jinja2's immutable sandbox with trim_blocks and lstrip_blocks, the
loop-control extension, `{% generation %}` blocks, `raise_exception`, `strftime_now` (UTC here,
as edgelm renders it; transformers uses local time) and a `tojson` that is json.dumps with
ensure_ascii off; variables `messages`,
`add_generation_prompt`, `tools` and `documents` (None), `bos_token`, `eos_token`.

usage: hf_chat_template.py CASES.json  (a list of {template, messages, bos_token, eos_token});
prints a JSON list with, per case, the rendered text or {"error": message}.
"""
import json
import sys
from datetime import datetime, timezone

from jinja2 import nodes
from jinja2.exceptions import TemplateError
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment


class Generation(Extension):
    """`{% generation %}...{% endgeneration %}` as transformers' extension renders it: the
    inside, unchanged, called as a block (so what it sets stays inside)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_inside"), [], [], body).set_lineno(lineno)

    def _inside(self, caller):
        return caller()


def raise_exception(message):
    raise TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def main():
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now(timezone.utc).strftime(fmt)
    out = []
    for case in json.load(open(sys.argv[1])):
        try:
            text = env.from_string(case["template"]).render(
                messages=case["messages"],
                add_generation_prompt=True,
                tools=None,
                documents=None,
                bos_token=case["bos_token"],
                eos_token=case["eos_token"],
            )
            out.append(text)
        except TemplateError as e:
            out.append({"error": str(e)})
    json.dump(out, sys.stdout, ensure_ascii=False)


main()
