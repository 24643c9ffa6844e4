// Greedy generations of one GGUF through node-llama-cpp (the copy inside the installed QMD) with and without the
// repeat-penalty options QMD passes, to show whether its presence penalty does anything.  Prints a JSON object.
// Usage: node presence.mjs MODEL.gguf   (QMD_UNSLOTH_QMD_DIR: the QMD folder of qmd_unsloth.qmd_real)
import { pathToFileURL } from "node:url";
import { join } from "node:path";

const nlc = await import(pathToFileURL(join(process.env.QMD_UNSLOTH_QMD_DIR, "node_modules", "node-llama-cpp",
                                            "dist", "index.js")).href);
const llama = await nlc.getLlama({ gpu: false });
const model = await llama.loadModel({ modelPath: process.argv[2] });
async function run(repeatPenalty) {
  const context = await model.createContext({ contextSize: 2048, threads: 1 });
  const session = new nlc.LlamaChatSession({ contextSequence: context.getSequence() });
  const text = await session.prompt("/no_think Expand this search query: auth config",
                                    { maxTokens: 80, temperature: 0, ...(repeatPenalty ? { repeatPenalty } : {}) });
  await context.dispose();
  return text;
}
const out = {
  none: await run(null),
  qmd: await run({ lastTokens: 64, presencePenalty: 0.5 }),
  strong: await run({ lastTokens: 64, presencePenalty: 5 }),
  strong_with_penalty: await run({ lastTokens: 64, presencePenalty: 5, penalty: 1.0001 }),
};
process.stdout.write(JSON.stringify(out) + "\n");
