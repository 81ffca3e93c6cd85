// The official `openai` npm package against `tokenlake serve` (run by run.sh): completions and
// chat, streamed and not, usage with cached tokens on a repeated prompt, seeds, stop sequences
// and errors. Exits 1 naming the first check that failed.
import OpenAI from "openai";

const port = process.argv[2];
const client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: "unused", maxRetries: 0 });
let failures = 0;
function check(ok, what, detail) {
  if (ok) {
    console.log(`ok   ${what}`);
  } else {
    failures++;
    console.log(`FAIL ${what}: ${JSON.stringify(detail)}`);
  }
}

const models = await client.models.list();
const model = models.data[0]?.id;
check(typeof model === "string" && model.length > 0, "GET /v1/models lists the served model", models.data);

// A long shared prompt (several 16-token segments) so that a repeat hits the pool.
const prompt = "The quick brown fox jumps over the lazy dog. ".repeat(6);
const first = await client.completions.create({ model, prompt, max_tokens: 8 });
check(first.object === "text_completion" && first.choices.length === 1, "completion object", first);
check(first.usage.prompt_tokens > 32 && first.usage.completion_tokens === 8 &&
      first.usage.total_tokens === first.usage.prompt_tokens + 8, "completion usage", first.usage);
check(["length", "stop"].includes(first.choices[0].finish_reason), "completion finish_reason", first.choices[0]);
const again = await client.completions.create({ model, prompt, max_tokens: 8 });
check(again.choices[0].text === first.choices[0].text, "greedy answers repeat", [first.choices[0].text, again.choices[0].text]);
check(again.usage.prompt_tokens_details?.cached_tokens > 0, "a repeated prompt is served from the pool (cached_tokens > 0)", again.usage);

// Streamed completion: the chunks' text equals the non-streamed answer.
const stream = await client.completions.create({ model, prompt, max_tokens: 8, stream: true,
                                                 stream_options: { include_usage: true } });
let streamed = "", finish = null, usage = null, chunks = 0;
for await (const chunk of stream) {
  chunks++;
  if (chunk.usage) usage = chunk.usage;
  for (const c of chunk.choices) {
    streamed += c.text;
    if (c.finish_reason) finish = c.finish_reason;
  }
}
check(streamed === first.choices[0].text, "streamed completion equals the answer", [streamed, first.choices[0].text]);
check(finish === first.choices[0].finish_reason && chunks >= 2, "streamed completion ends with its finish_reason", { finish, chunks });
check(usage && usage.completion_tokens === 8 && usage.prompt_tokens_details.cached_tokens > 0,
      "stream_options.include_usage sends usage", usage);

// Seeded sampling: the same seed gives the same text.
const sampled = async (seed) => (await client.completions.create(
    { model, prompt: "Once upon a time", max_tokens: 12, temperature: 1.0, top_p: 0.95, seed })).choices[0].text;
const s1 = await sampled(42), s2 = await sampled(42), s3 = await sampled(43);
check(s1 === s2, "the same seed gives the same tokens", [s1, s2]);
check(s1 !== s3, "another seed gives other tokens", [s1, s3]);

// Chat, not streamed and streamed.
const messages = [{ role: "system", content: "You are terse." }, { role: "user", content: "Say hi. 😀 é" }];
const chat = await client.chat.completions.create({ model, messages, max_tokens: 10 });
check(chat.object === "chat.completion" && chat.choices[0].message.role === "assistant" &&
      typeof chat.choices[0].message.content === "string", "chat completion object", chat);
check(chat.usage.completion_tokens >= 1 && chat.usage.completion_tokens <= 10, "chat usage", chat.usage);
const chatStream = await client.chat.completions.create({ model, messages, max_tokens: 10, stream: true });
let roleFirst = null, content = "", chatFinish = null;
for await (const chunk of chatStream) {
  for (const c of chunk.choices) {
    if (roleFirst === null) roleFirst = c.delta.role ?? "";
    content += c.delta.content ?? "";
    if (c.finish_reason) chatFinish = c.finish_reason;
  }
}
check(roleFirst === "assistant", "the first chat chunk carries the assistant role", roleFirst);
check(content === chat.choices[0].message.content && chatFinish === chat.choices[0].finish_reason,
      "streamed chat equals the answer", [content, chat.choices[0].message.content, chatFinish]);

// A stop sequence taken from the greedy answer: the text ends before it.
const full = first.choices[0].text;
const cut = [...full].findIndex((ch, i) => i > 0 && ch.trim() !== "");
if (cut > 0) {
  const stopText = [...full].slice(cut, cut + 1).join("");
  const stopped = await client.completions.create({ model, prompt, max_tokens: 8, stop: [stopText] });
  check(stopped.choices[0].finish_reason === "stop" && !stopped.choices[0].text.includes(stopText) &&
        full.startsWith(stopped.choices[0].text), "a stop sequence ends the text before it",
        [stopText, stopped.choices[0].text, full]);
}

// Errors come back as OpenAI's errors.
try {
  await client.completions.create({ model, prompt, max_tokens: 4, n: 2 });
  check(false, "n = 2 is refused", "no error");
} catch (e) {
  check(e instanceof OpenAI.BadRequestError && e.status === 400 && /n/.test(e.message) && e.param === "n",
        "n = 2 is refused with a 400 naming the param", { status: e.status, message: e.message, param: e.param });
}
try {
  await client.chat.completions.create({ model, messages: [{ role: "wizard", content: "x" }] });
  check(false, "an unknown role is refused", "no error");
} catch (e) {
  check(e.status === 400 && /wizard/.test(e.message), "an unknown role is refused with a 400", { status: e.status, message: e.message });
}
try {
  await client.completions.create({ model, prompt, temperature: 5 });
  check(false, "temperature 5 is refused", "no error");
} catch (e) {
  check(e.status === 400 && /temperature/.test(e.message), "temperature out of range is refused", { status: e.status, message: e.message });
}

console.log(failures === 0 ? "all checks passed" : `${failures} check(s) failed`);
process.exit(failures === 0 ? 0 : 1);
