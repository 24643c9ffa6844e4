// QMD's own query expansion (LlamaCpp.expandQuery from the installed QMD's dist/llm.js), for a list of queries.
// Run by qmd_unsloth.qmd_real with the hook preloaded:  node --import hook.mjs expand.mjs MODEL.gguf < queries.json
// Prints one JSON line per query: the query, what expandQuery returned (after QMD's drop rule and fallback) and the
// hook's capture of the chat prompt (context fed to the model, raw response, generated tokens, stop reason).
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";
import { join } from "node:path";

const [model] = process.argv.slice(2);
const queries = JSON.parse(readFileSync(0, "utf-8"));
const { LlamaCpp } = await import(pathToFileURL(join(process.env.QMD_UNSLOTH_QMD_DIR, "node_modules", "@tobilu",
                                                      "qmd", "dist", "llm.js")).href);
const llm = new LlamaCpp({ generateModel: model });
try {
  for (const query of queries) {
    const before = globalThis.__qmdUnslothCaptures.length;
    const t0 = performance.now();
    const queryables = await llm.expandQuery(query);
    const seconds = (performance.now() - t0) / 1000;
    const capture = globalThis.__qmdUnslothCaptures.slice(before);
    process.stdout.write(JSON.stringify({ query, queryables, seconds, capture: capture[0] ?? null }) + "\n");
  }
} finally {
  await llm.dispose();
}
