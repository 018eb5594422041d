"""The self-contained HTML report (one input, or a section per input, each with its own head view): inline CSS and
JS, images as data URIs, no network; every string that comes from a model or an input is escaped (html.escape in
markup; JSON for the head view with <, > and & as \\u escapes, and the script writes tokens with textContent)."""
import base64
import html
import json

import numpy as np

_STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1200px}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 6px;font-size:12px}.tok{display:inline-block;margin:1px;padding:2px 3px;
border:1px solid #ddd;white-space:pre;font-family:monospace;cursor:default}img{max-width:100%}"""

# The head view of one input section; its element ids end with the section's suffix ('' on a one-input page).
_HEAD_VIEW_JS = """(function(s){const d=JSON.parse(document.getElementById('attn-data'+s).textContent);
const ls=document.getElementById('hv-layer'+s),hs=document.getElementById('hv-head'+s),
box=document.getElementById('hv'+s);
function opt(e,n,p){for(let i=0;i<n;i++){const o=document.createElement('option');o.value=i;o.textContent=p+i;
e.appendChild(o);}}opt(ls,d.attention.length,'layer ');opt(hs,d.attention[0].length,'head ');
function show(q){const a=d.attention[+ls.value][+hs.value];box.querySelectorAll('.tok').forEach((el,k)=>{
const w=q<0?0:a[q][k];el.style.background='rgba(30,100,220,'+Math.min(1,w*1.5)+')';
el.style.outline=k===q?'2px solid #d22':'';});}
d.tokens.forEach((t,k)=>{const e=document.createElement('span');e.className='tok';e.textContent=t;
e.title='position '+k;e.addEventListener('mouseenter',()=>show(k));box.appendChild(e);});
ls.onchange=hs.onchange=()=>show(-1);show(-1);})"""


def script_json(value) -> str:
  """JSON that is safe inside a <script> element: no '<', '>' or '&' can end it or open a tag."""
  return json.dumps(value).replace('<', '\\u003c').replace('>', '\\u003e').replace('&', '\\u0026')


def data_uri(png_path: str) -> str:
  with open(png_path, 'rb') as f:
    return 'data:image/png;base64,' + base64.b64encode(f.read()).decode('ascii')


def _scores_table(tokens: list[str], scores: dict) -> str:
  head = ''.join(f'<th>{html.escape(m)}</th>' for m in scores)
  rows = ''.join(f'<tr><td>{k}</td><td class="tok">{html.escape(t)}</td>'
                 + ''.join(f'<td>{float(v[k]):+.4f}</td>' for v in scores.values()) + '</tr>'
                 for k, t in enumerate(tokens))
  return f'<table><tr><th>#</th><th>token</th>{head}</tr>{rows}</table>'


def _lens_table(rows: list[dict], decode) -> str:
  body = ''.join(f'<tr><td>{html.escape(r["layer"])}</td><td>'
                 + ', '.join(f'{html.escape(decode(i))} ({p:.3f})' for i, p in zip(r['top_ids'], r['top_probs']))
                 + f'</td><td>{r.get("target_rank", "")}</td></tr>' for r in rows)
  return f'<table><tr><th>layer</th><th>top tokens (probability)</th><th>target rank</th></tr>{body}</table>'


def _routing_html(routing: list[dict]) -> str:
  parts = []
  for layer in routing:
    experts = ''.join(f'<tr><td>{e}</td><td>' + ' '.join(f'<span class="tok">{html.escape(t)}</span>' for _, t in v)
                      + '</td></tr>' for e, v in layer['tokens_per_expert'].items())
    parts.append(f'<h3>MoE layer {layer["layer"]}</h3><table><tr><th>expert</th><th>tokens</th></tr>{experts}</table>')
  return ''.join(parts)


def summary_table(summary: dict) -> str:
  """A two-column table of `summary`'s keys and values, escaped."""
  return '<table>' + ''.join(f'<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>'
                             for k, v in summary.items()) + '</table>'


def input_section(*, text: str, tokens: list[str], summary: dict, scores: dict, attention_XHLL=None, lens_rows=None,
                  decode=str, routing=None, images=(), heading: int = 2, suffix: str = '') -> str:
  """One input's part of a report: the input, its summary table, per-token scores, the head view, logit lens, MoE
  routing and `images` ((caption, png path), inlined); headings at level `heading`, element ids ending in `suffix`."""
  h = lambda title: f'<h{heading}>{title}</h{heading}>'
  sections = [f'<p>Input: <code>{html.escape(text)}</code></p>', summary_table(summary)]
  if scores:
    sections.append(h('Attribution per token') + _scores_table(tokens, scores))
  if attention_XHLL is not None:
    data = {'tokens': tokens, 'attention': np.round(np.asarray(attention_XHLL, np.float64), 4).tolist()}
    sections.append(h('Head view') + '<p>Pick a layer and head; hover a token to see where it attends.</p>'
                    f'<select id="hv-layer{suffix}"></select> <select id="hv-head{suffix}"></select>'
                    f'<div id="hv{suffix}"></div>'
                    f'<script type="application/json" id="attn-data{suffix}">{script_json(data)}</script>'
                    f'<script>{_HEAD_VIEW_JS}({script_json(suffix)});</script>')
  if lens_rows:
    sections.append(h('Logit lens') + _lens_table(lens_rows, decode))
  if routing:
    sections.append(h('MoE routing') + _routing_html(routing))
  for caption, png in images:
    sections.append(f'<figure><img alt="{html.escape(caption)}" src="{data_uri(png)}">'
                    f'<figcaption>{html.escape(caption)}</figcaption></figure>')
  return ''.join(sections)


def write_page(path: str, title: str, body: list[str]) -> str:
  """Writes a self-contained page: the title as <h1>, then the `body` parts (HTML, already escaped)."""
  page = (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
          f'<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{"".join(body)}</body></html>')
  with open(path, 'w', encoding='utf-8') as f:
    f.write(page)
  return path


def write_report(path: str, *, title: str, **section) -> str:
  """Writes a one-input report to `path`; `section` is input_section's arguments (`scores` maps a method to
  per-token values, `images` are (caption, png path))."""
  return write_page(path, title, [input_section(**section)])
