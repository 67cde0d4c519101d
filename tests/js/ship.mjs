// Runs export folders with the JavaScript runtimes, exactly as a user would, and writes what they
// produced as JSON; tests/e2e/test_ship_js.py builds the job and compares every number with Python.
//
//   node ship.mjs job.json result.json
//
// job.json: {"exports": [{"folder", "variants": {name: {"file", "dtype"}},
//             "steps": [{input_ids, attention_mask, position_ids}, ...],   // one chained cache
//             "texts": [...], "prompts": [[ids]], "batch": {input_ids, attention_mask},
//             "max_new_tokens"}], "keep_going": false}
// keep_going (benchmarks/runtimes.py): an export that throws gets {"error": "<its message>"} and the next
// one runs; without it the first error ends the process (the tests want that).
// result.json, per export: {"tokenizer": [[ids] per text],
//   "variants": {name: {"ort": [{dims, logits}] per step, "forward": {dims, logits},
//                      "greedy": [[ids] per prompt], "batch": [[ids] per row]}}}
import fs from 'node:fs';
import path from 'node:path';
import * as ort from 'onnxruntime-node';
import { env, AutoTokenizer, AutoModelForCausalLM, Tensor } from '@huggingface/transformers';

const [jobPath, outPath] = process.argv.slice(2);
const job = JSON.parse(fs.readFileSync(jobPath, 'utf8'));

// transformers.js loads from a local folder only: no hub, no cache
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.useFSCache = false;

const int64 = (rows) => new ort.Tensor('int64', BigInt64Array.from(rows.flat().map(BigInt)), [rows.length, rows[0].length]);
const hfInt64 = (rows) => new Tensor('int64', BigInt64Array.from(rows.flat().map(BigInt)), [rows.length, rows[0].length]);
const plain = (t) => ({ dims: Array.from(t.dims), logits: Array.from(t.data) });
const rows = (t) => t.tolist().map((r) => r.map(Number));

// onnxruntime-node: the graph as is, the cache chained through the steps. The empty cache is sized
// from the graph's metadata (heads and head size must be fixed integers there), as transformers.js does;
// a state (LFM2's past_conv.*) is zeros of its fixed shape, fed back from present_conv.* as transformers.js
// does (getPastKeyValues).
const isState = (n) => /^past_(conv|ssm|recurrent)\./.test(n);
async function runOrt(file, steps) {
  const session = await ort.InferenceSession.create(file);
  const pastNames = session.inputNames.filter((n) => n.startsWith('past_key_values.') || isState(n));
  const meta = Object.fromEntries(session.inputMetadata.map((m) => [m.name, m]));
  const batch = steps[0].input_ids.length;
  let past = Object.fromEntries(pastNames.map((n) => {
    const type = meta[n].type;
    const cls = type === 'float16' ? Uint16Array : Float32Array;
    if (isState(n)) {
      const dims = [batch, ...meta[n].shape.slice(1)];
      if (!dims.every(Number.isInteger)) throw new Error(`${n}: symbolic state dims`);
      return [n, new ort.Tensor(type, new cls(dims.reduce((a, b) => a * b, 1)), dims)];
    }
    const [, heads, , headDim] = meta[n].shape;
    if (!Number.isInteger(heads) || !Number.isInteger(headDim)) throw new Error(`${n}: symbolic heads/head size`);
    return [n, new ort.Tensor(type, new cls(0), [batch, heads, 0, headDim])];
  }));
  const out = [];
  for (const step of steps) {
    const feeds = { input_ids: int64(step.input_ids), attention_mask: int64(step.attention_mask),
                    position_ids: int64(step.position_ids), ...past };
    const result = await session.run(feeds);
    out.push(plain(result.logits));
    past = Object.fromEntries(pastNames.map((n) => [n, result[isState(n) ? n.replace('past_', 'present_')
                                                                           : n.replace('past_key_values.', 'present.')]]));
  }
  await session.release();
  return out;
}

async function runExport(ex) {
  const folder = path.resolve(ex.folder);
  env.localModelPath = path.dirname(folder) + path.sep;
  const id = path.basename(folder);
  const tokenizer = await AutoTokenizer.from_pretrained(id);
  const one = { tokenizer: ex.texts.map((t) => tokenizer.encode(t, { add_special_tokens: false })), variants: {} };
  for (const [name, v] of Object.entries(ex.variants)) {
    const r = { ort: await runOrt(path.join(folder, v.file), ex.steps) };
    const model = await AutoModelForCausalLM.from_pretrained(id, { dtype: v.dtype, device: 'cpu' });
    const s0 = ex.steps[0];
    r.forward = plain((await model({ input_ids: hfInt64(s0.input_ids), attention_mask: hfInt64(s0.attention_mask) })).logits);
    r.greedy = [];
    for (const p of ex.prompts) {
      const ids = [p];
      const mask = [p.map(() => 1)];
      const seq = await model.generate({ input_ids: hfInt64(ids), attention_mask: hfInt64(mask),
                                         max_new_tokens: ex.max_new_tokens, do_sample: false });
      r.greedy.push(rows(seq)[0].slice(p.length));
    }
    const width = ex.batch.input_ids[0].length;
    const seq = await model.generate({ input_ids: hfInt64(ex.batch.input_ids), attention_mask: hfInt64(ex.batch.attention_mask),
                                       max_new_tokens: ex.max_new_tokens, do_sample: false });
    r.batch = rows(seq).map((row) => row.slice(width));
    await model.dispose();
    one.variants[name] = r;
  }
  return one;
}

const result = { exports: [] };
for (const ex of job.exports) {
  if (!job.keep_going) {
    result.exports.push(await runExport(ex));
    continue;
  }
  try {
    result.exports.push(await runExport(ex));
  } catch (e) {
    result.exports.push({ error: String(e && e.message ? e.message : e).split('\n')[0] });
  }
}
fs.writeFileSync(outPath, JSON.stringify(result));
