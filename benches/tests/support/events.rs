//! A chat completions stream as Azure OpenAI sends it: the prompt-filter
//! event, `n` content deltas, the finish event, the usage chunk and `[DONE]`,
//! one event per chunk.

use bytes::Bytes;

pub fn chat_stream(n: usize) -> Vec<Bytes> {
    let mut out = vec![Bytes::from_static(
        b"data: {\"choices\":[],\"created\":0,\"id\":\"\",\"model\":\"\",\"object\":\"\",\"prompt_filter_results\":[{\"prompt_index\":0,\"content_filter_results\":{}}]}\n\n",
    )];
    let words = [
        "The", " gateway", " routes", " each", " call", " to", " a", " region.",
    ];
    for i in 0..n {
        out.push(Bytes::from(format!(
            "data: {{\"choices\":[{{\"content_filter_results\":{{}},\"delta\":{{\"content\":\"{}\"}},\"finish_reason\":null,\"index\":0,\"logprobs\":null}}],\"created\":1733000000,\"id\":\"chatcmpl-AbCdEf\",\"model\":\"gpt-4o-2024-11-20\",\"object\":\"chat.completion.chunk\",\"system_fingerprint\":\"fp_abc\",\"usage\":null}}\n\n",
            words[i % words.len()]
        )));
    }
    out.push(Bytes::from_static(
        b"data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\",\"index\":0}],\"created\":1733000000,\"id\":\"chatcmpl-AbCdEf\",\"model\":\"gpt-4o-2024-11-20\",\"object\":\"chat.completion.chunk\",\"usage\":null}\n\n",
    ));
    out.push(Bytes::from(format!(
        "data: {{\"choices\":[],\"created\":1733000000,\"id\":\"chatcmpl-AbCdEf\",\"model\":\"gpt-4o-2024-11-20\",\"object\":\"chat.completion.chunk\",\"usage\":{{\"completion_tokens\":{n},\"prompt_tokens\":10,\"total_tokens\":{}}}}}\n\n",
        n + 10
    )));
    out.push(Bytes::from_static(b"data: [DONE]\n\n"));
    out
}
