// The Vercel AI SDK (ai + @ai-sdk/openai-compatible + zod), unmodified, against a real node.
// Run by tests/test_js_clients.py, which starts the node and passes DVAI_BASE_URL and DVAI_MODEL.
import assert from "node:assert/strict";
import { test } from "node:test";

import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateObject, generateText, tool } from "ai";
import { z } from "zod";

const baseURL = process.env.DVAI_BASE_URL;
const modelId = process.env.DVAI_MODEL;
assert.ok(baseURL && modelId, "DVAI_BASE_URL and DVAI_MODEL must be set");

const provider = createOpenAICompatible({
  name: "dvai",
  baseURL,
  apiKey: "unused",
  supportsStructuredOutputs: true,
});
const model = provider(modelId);

test("generateText calls a zod-described tool and gets its result", async () => {
  const seen = [];
  const weather = tool({
    description: "Current weather for a city",
    inputSchema: z.object({
      city: z.string().max(40),
      unit: z.enum(["celsius", "fahrenheit"]),
    }),
    execute: async ({ city, unit }) => {
      seen.push({ city, unit });
      return { city, unit, temperature: 21 };
    },
  });
  const result = await generateText({
    model,
    tools: { weather },
    toolChoice: "required",
    prompt: "What is the weather in Paris?",
    temperature: 0,
    maxOutputTokens: 120,
  });
  assert.equal(result.finishReason, "tool-calls");
  assert.equal(result.toolCalls.length >= 1, true);
  const call = result.toolCalls[0];
  assert.equal(call.toolName, "weather");
  assert.equal(typeof call.input.city, "string");
  assert.ok(["celsius", "fahrenheit"].includes(call.input.unit));
  assert.equal(seen.length, result.toolCalls.length, "the SDK ran the tool with the parsed input");
  assert.equal(result.toolResults[0].output.temperature, 21);
});

test("generateObject returns an object matching a zod schema", async () => {
  const schema = z.object({
    name: z.string().max(30),
    age: z.number().int().min(0).max(120),
    tags: z.array(z.enum(["red", "green", "blue"])).max(3),
    address: z.object({ city: z.string().max(30), zip: z.string().regex(/^[0-9]{5}$/) }),
  });
  const { object, finishReason } = await generateObject({
    model,
    schema,
    prompt: "Describe a person living in Lyon as JSON.",
    temperature: 0,
    maxOutputTokens: 200,
  });
  assert.equal(finishReason, "stop");
  const parsed = schema.parse(object); // throws when it does not match
  assert.ok(parsed.age >= 0 && parsed.age <= 120);
  assert.match(parsed.address.zip, /^[0-9]{5}$/);
});
