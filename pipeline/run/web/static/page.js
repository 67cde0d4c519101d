// The page `onnxgen web` serves: one export, run in this browser by transformers.js (onnxruntime-web,
// WASM or WebGPU). Everything is loaded from the same server: the bundle, onnxruntime-web's WASM, the export.
//
// A link starts a run: ?prompt=...&max_new_tokens=N&dtype=fp32|q8|q4|fp16&do_sample=0|1
//                      [&temperature=T&device=wasm|webgpu&mode=completion|chat]
// The generated text (the completion only, special tokens skipped) goes into #output, which gets
// data-done="true" when the run has finished (data-done="error" and #error's text if it failed).
import {
  env, AutoTokenizer, AutoModelForCausalLM, TextStreamer, InterruptableStoppingCriteria,
} from '/vendor/transformers/transformers.min.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const info = await (await fetch('/export.json')).json();

// the export is a local model under /models/; never the Hub, never a CDN
env.allowRemoteModels = false;
env.allowLocalModels = true;
env.localModelPath = info.model_path;
env.useBrowserCache = false;  // an export re-made under the same name must be read again

const MB = (n) => (n / 1e6).toFixed(n < 1e7 ? 2 : 1) + ' MB';
const VARIANT_OF = { fp32: 'fp32', fp16: 'fp16', q8: 'int8', q4: 'int4' };
const ALIASES = { int8: 'q8', int4: 'q4', quantized: 'q8' };

// ------------------------------------------------------------------ the form, from the export and the URL
$('name').textContent = info.name;
$('about').textContent = `${info.model_type}, ${info.layers} layers, hidden ${info.hidden}, context ${info.context}` +
  ` · transformers.js ${info.runtime['transformers.js']} on onnxruntime-web ${info.runtime['onnxruntime-web']}` +
  ' · runs in this browser; nothing leaves the page';
const dtypes = Object.values(info.variants).map((v) => v.dtype);
for (const v of Object.values(info.variants)) {
  $('dtype').add(new Option(`${v.dtype} (${VARIANT_OF[v.dtype]}, ${MB(v.bytes)})`, v.dtype));
}
$('dtype').value = ['q4', 'q8', 'fp32', 'fp16'].find((d) => dtypes.includes(d));

const gpu = 'gpu' in navigator ? await navigator.gpu.requestAdapter().catch(() => null) : null;
if (!gpu) {
  $('device').options[1].disabled = true;
  $('device').options[1].text = 'WebGPU (not in this browser)';
} else {
  $('device').value = 'webgpu';
}
if (!info.chat_template) {
  $('mode').options[1].disabled = true;
  $('mode').options[1].text = 'chat (no chat template)';
}

const wanted = {
  prompt: params.get('prompt'), max_new_tokens: params.get('max_new_tokens'),
  dtype: ALIASES[params.get('dtype')] ?? params.get('dtype'), do_sample: params.get('do_sample'),
  temperature: params.get('temperature'), device: params.get('device'), mode: params.get('mode'),
};
if (wanted.dtype) $('dtype').value = wanted.dtype;
if (wanted.device) $('device').value = wanted.device;

// onnxruntime-web ships two WASM builds and a page can start only one: the WebGPU one (asyncify) lacks some
// CPU kernels that quantized exports use (GatherBlockQuantized, the int4/int8 embedding), so WASM runs get
// the plain build. Choosing the other device reloads the page with it.
const build = $('device').value === 'webgpu' ? 'ort-wasm-simd-threaded.asyncify' : 'ort-wasm-simd-threaded';
env.backends.onnx.wasm.wasmPaths = {
  mjs: new URL(`/vendor/ort/${build}.mjs`, location.href).href,
  wasm: new URL(`/vendor/ort/${build}.wasm`, location.href).href,
};
const startedOn = $('device').value;
$('device').addEventListener('change', () => {
  if ($('device').value === startedOn) return;
  const next = new URLSearchParams(location.search);
  next.set('device', $('device').value);
  next.delete('prompt');  // a reload to switch runtimes, not a new run
  location.search = next.toString();
});
if (wanted.mode) $('mode').value = wanted.mode;
if (wanted.max_new_tokens) $('max_new_tokens').value = wanted.max_new_tokens;
if (wanted.temperature) $('temperature').value = wanted.temperature;
if (wanted.do_sample !== null) $('do_sample').checked = !['0', 'false', ''].includes(wanted.do_sample);
if (wanted.prompt !== null) $('prompt').value = wanted.prompt;

// ------------------------------------------------------------------ loading
let loaded = null;   // { key, tokenizer, model }
let template = null; // chat_template.jinja's text (the tokenizer reads only tokenizer_config.json's)
const messages = [];

function status(text) { $('status').textContent = text; }

function fail(err) {
  console.error(err);
  $('error').hidden = false;
  $('error').textContent = String(err?.stack ?? err);
  $('output').dataset.done = 'error';
  status('failed');
  $('generate').textContent = 'generate';
  $('generate').disabled = false;  // another dtype or device may work
  $('stop').disabled = true;
}

async function load(dtype, device) {
  const key = `${dtype}/${device}`;
  if (loaded?.key === key) return loaded;
  if (loaded) await loaded.model.dispose();
  loaded = null;
  const t0 = performance.now();
  const sizes = {};
  const progress_callback = (p) => {
    if (p.status === 'progress' && p.total) {
      sizes[p.file] = p.total;
      status(`downloading ${p.file}: ${Math.round(p.progress)}%`);
    }
  };
  const tokenizer = await AutoTokenizer.from_pretrained(info.name, { progress_callback });
  if (info.chat_template?.file && template === null) {
    template = await (await fetch(`${info.model_path}${info.name}/${info.chat_template.file}`)).text();
  }
  status(`loading ${dtype} on ${device}…`);
  const model = await AutoModelForCausalLM.from_pretrained(info.name, { dtype, device, progress_callback });
  const seconds = (performance.now() - t0) / 1000;
  const threads = env.backends.onnx.wasm.numThreads ?? 1;
  const variant = info.variants[VARIANT_OF[dtype]];
  const downloaded = Object.values(sizes).reduce((a, b) => a + b, 0) || variant.bytes + info.shared_bytes;
  $('stat-download').textContent = `${MB(downloaded)} (weights ${MB(variant.bytes)})`;
  $('stat-load').textContent = `${seconds.toFixed(2)} s`;
  $('stat-backend').textContent = `${device === 'webgpu' ? 'WebGPU' : 'WASM'} · ${dtype}` +
    (device === 'wasm' ? ` · ${threads} thread${threads === 1 ? '' : 's'}` : '');
  loaded = { key, tokenizer, model };
  return loaded;
}

// ------------------------------------------------------------------ generating
let stopper = null;

function showHistory(turns = messages) {
  $('history').replaceChildren(...turns.map((m) => {
    const div = document.createElement('div');
    div.className = `turn ${m.role}`;
    div.textContent = `${m.role === 'user' ? 'you' : 'model'}: ${m.content}`;
    return div;
  }));
}

async function generate() {
  const output = $('output');
  output.dataset.done = 'false';
  output.textContent = '';
  $('error').hidden = true;
  $('generate').disabled = true;
  const { tokenizer, model } = await load($('dtype').value, $('device').value);
  const prompt = $('prompt').value;
  const chat = $('mode').value === 'chat';
  let inputs;
  if (chat) {
    messages.push({ role: 'user', content: prompt });
    showHistory();
    inputs = tokenizer.apply_chat_template(messages, {
      add_generation_prompt: true, return_dict: true, ...(template ? { chat_template: template } : {}),
    });
    $('prompt-echo').textContent = '';
  } else {
    inputs = tokenizer(prompt);  // through tokenizer.json's post-processor, as transformers does
    $('prompt-echo').textContent = prompt;
  }
  const promptLength = inputs.input_ids.dims.at(-1);
  let tokens = 0, firstAt = null, lastAt = null, text = '';
  const started = performance.now();
  const streamer = new TextStreamer(tokenizer, {
    skip_prompt: true, skip_special_tokens: true,
    callback_function: (piece) => { text += piece; output.textContent = text; },
    token_callback_function: () => {
      lastAt = performance.now();
      firstAt ??= lastAt;
      tokens += 1;
      $('stat-tokens').textContent = String(tokens);
      // decode speed: tokens after the first over the time since it (the first includes the prompt's pass)
      if (tokens > 1) $('stat-speed').textContent = ((tokens - 1) / ((lastAt - firstAt) / 1000)).toFixed(1);
    },
  });
  stopper = new InterruptableStoppingCriteria();
  $('stop').disabled = false;
  status('generating…');
  const doSample = $('do_sample').checked;
  const sequences = await model.generate({
    ...inputs, max_new_tokens: Number($('max_new_tokens').value), do_sample: doSample,
    ...(doSample ? { temperature: Number($('temperature').value) } : {}),
    streamer, stopping_criteria: stopper,
  });
  const ids = sequences.tolist()[0].slice(promptLength);
  const completion = tokenizer.decode(ids, { skip_special_tokens: true });
  output.textContent = completion;  // the whole decode: equal to the streamed pieces, without a held-back tail
  if (chat) {
    messages.push({ role: 'assistant', content: completion });
    showHistory(messages.slice(0, -1));  // the last reply stays in #output
    $('prompt').value = '';
  }
  $('stat-first').textContent = firstAt ? `${(firstAt - started).toFixed(0)} ms` : '–';
  output.dataset.tokens = String(tokens);
  output.dataset.tokensPerSecond = tokens > 1 ? ((tokens - 1) / ((lastAt - firstAt) / 1000)).toFixed(2) : '';
  output.dataset.completion = completion;
  // token ids, for scripts that check the run against another runtime's
  output.dataset.promptIds = inputs.input_ids.tolist()[0].join(',');
  output.dataset.ids = ids.join(',');
  output.dataset.done = 'true';
  status(`done: ${tokens} tokens`);
  $('stop').disabled = true;
  $('generate').disabled = false;
}

$('form').addEventListener('submit', (e) => { e.preventDefault(); generate().catch(fail); });
$('stop').addEventListener('click', () => stopper?.interrupt());
$('clear').addEventListener('click', () => { messages.length = 0; showHistory(); });
$('dtype').addEventListener('change', () => { $('stat-download').textContent = '–'; });
const showChatControls = () => { $('clear').hidden = $('mode').value !== 'chat'; };
$('mode').addEventListener('change', showChatControls);
showChatControls();

try {
  await load($('dtype').value, $('device').value);
  $('generate').textContent = 'generate';
  $('generate').disabled = false;
  status('ready');
  if (wanted.prompt !== null) await generate();
} catch (err) {
  fail(err);
}
