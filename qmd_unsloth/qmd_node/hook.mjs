// Preloaded into the real QMD's node process (node --import) by qmd_unsloth.qmd_real.  It changes nothing QMD sends
// or samples; it only
//  * records every chat prompt QMD makes through node-llama-cpp: the exact context tokens fed to the model
//    (detokenized with special tokens), the chat wrapper node-llama-cpp chose, the generated text, the number of
//    generated tokens and why generation stopped (QMD_UNSLOTH_CAPTURE=FILE appends one JSON line per prompt), and
//  * when QMD_UNSLOTH_THREADS=N is set, gives every context N CPU threads.  This is a harness choice for small
//    machines: node-llama-cpp gives CPU contexts max(4, cores) threads and QMD sets none, which on 2 cores makes
//    one expansion many times slower.  Threads change speed, not the tokens sampled.
//  * when QMD_UNSLOTH_MAX_TOKENS=N is set, caps generation at N tokens: for capturing the context alone (the prompt
//    is built before the first token), never for measuring an expansion.
//  * when QMD_UNSLOTH_SCRIPT=FILE is set (tests and `bench retrieval --engine qmd` only), answers QMD's expansion
//    prompt for a query found in FILE (a JSON object {query: response text}) with that text instead of sampling the
//    model: everything QMD does with a response (parsing, drop rule, fallback, caching, search) then runs for real
//    on a known response.  Queries not in FILE go to the model as usual.  See installScript below.
import { appendFileSync, readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";
import { join } from "node:path";

// node-llama-cpp tests its native binding in a forked child that inherits --import: leave that child alone.
const qmdDir = process.env.TEST_BINDING_CP ? null : process.env.QMD_UNSLOTH_QMD_DIR;
if (qmdDir) await patch(await import(pathToFileURL(join(qmdDir, "node_modules", "node-llama-cpp", "dist",
                                                          "index.js")).href));

async function patch(nlc) {
  const threads = Number.parseInt(process.env.QMD_UNSLOTH_THREADS ?? "", 10);
  if (threads > 0) {
    for (const [cls, method] of [[nlc.LlamaModel, "createContext"], [nlc.LlamaModel, "createEmbeddingContext"],
                                 [nlc.LlamaModel, "createRankingContext"]]) {
      const original = cls.prototype[method];
      if (typeof original !== "function") continue;
      cls.prototype[method] = function (options = {}) {
        return original.call(this, { ...options, threads });
      };
    }
  }

  if (process.env.QMD_UNSLOTH_SCRIPT) installScript(nlc, process.env.QMD_UNSLOTH_SCRIPT);

  const captureFile = process.env.QMD_UNSLOTH_CAPTURE;
  globalThis.__qmdUnslothCaptures = [];
  const originalPromptWithMeta = nlc.LlamaChatSession.prototype.promptWithMeta;
  nlc.LlamaChatSession.prototype.promptWithMeta = async function (prompt, options = {}) {
    const generated = [];
    const userOnToken = options.onToken;
    const t0 = performance.now();
    const cap = Number.parseInt(process.env.QMD_UNSLOTH_MAX_TOKENS ?? "", 10);
    const meta = await originalPromptWithMeta.call(this, prompt, {
      ...options,
      ...(cap > 0 ? { maxTokens: Math.min(cap, options.maxTokens ?? cap) } : {}),
      onToken: (tokens) => { generated.push(...tokens); if (userOnToken) userOnToken(tokens); },
    });
    const model = this.model;
    const context = Array.from(this.sequence.contextTokens);
    // the context holds the prompt tokens followed by the generated ones (the last may not have been evaluated)
    let promptLength = context.length;
    for (const n of [generated.length, generated.length - 1]) {
      if (n >= 0 && n <= context.length && context.slice(context.length - n).every((t, i) => t === generated[i])) {
        promptLength = context.length - n;
        break;
      }
    }
    const record = {
      prompt,
      chat_wrapper: this.chatWrapper?.wrapperName ?? null,
      model_path: model._modelPath ?? null,  // the GGUF file node-llama-cpp loaded (an internal field of LlamaModel)
      context: model.detokenize(context.slice(0, promptLength), true),
      context_ids: context.slice(0, promptLength),
      context_tokens: promptLength,
      generated_ids: generated,
      response: meta.responseText,
      generated_tokens: generated.length,
      stop_reason: meta.stopReason,
      seconds: (performance.now() - t0) / 1000,
    };
    globalThis.__qmdUnslothCaptures.push(record);
    if (captureFile) appendFileSync(captureFile, JSON.stringify(record) + "\n");
    return meta;
  };
}

// Scripted expansion responses (QMD_UNSLOTH_SCRIPT): QMD's LlamaCpp.expandQuery prompts
// `/no_think Expand this search query: ${query}`; for a query in the script the session answers with the scripted
// text (stop reason "scripted") without evaluating the model.  The model is still loaded and its context created, as
// QMD does before prompting.
function installScript(nlc, file) {
  const script = JSON.parse(readFileSync(file, "utf-8"));
  const prefix = "/no_think Expand this search query: ";
  const real = nlc.LlamaChatSession.prototype.promptWithMeta;
  nlc.LlamaChatSession.prototype.promptWithMeta = async function (prompt, options = {}) {
    const query = typeof prompt === "string" && prompt.startsWith(prefix) ? prompt.slice(prefix.length) : null;
    if (query === null || !Object.hasOwn(script, query)) return real.call(this, prompt, options);
    const text = script[query];
    return { response: [text], responseText: text, stopReason: "scripted" };
  };
}
