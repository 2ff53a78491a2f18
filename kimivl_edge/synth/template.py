"""The chat template synthetic checkpoints ship (``chat_template.jinja`` and tokenizer_config.json "chat_template").

The runtime and the converter never use it: they render with the checkpoint's own template
(``prompt.load_chat_template``, or the copy the converter stores in the GGUF).
"""
from __future__ import annotations

# §7.1: Instruct's chat_template.jinja, verbatim (data). The rendered prompt has no newlines and no [BOS].
KIMI_VL_CHAT_TEMPLATE = """\
{%- for message in messages -%}
  {%- if loop.first and messages[0]['role'] != 'system' -%}
    {{'<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>'}}
  {%- endif -%}
  {%- if message['role'] == 'system' -%}
    {{'<|im_system|>'}}
  {%- endif -%}
  {%- if message['role'] == 'user' -%}
    {{'<|im_user|>'}}
  {%- endif -%}
  {%- if message['role'] == 'assistant' -%}
    {{'<|im_assistant|>'}}
  {%- endif -%}
  {{- message['role'] -}}
  {{'<|im_middle|>'}}
  {%- if message['content'] is string -%}
    {{- message['content'] + '<|im_end|>' -}}
  {%- else -%}
    {%- for content in message['content'] -%}
      {%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}
        {{'<|media_start|>image<|media_content|><|media_pad|><|media_end|>'}}
      {%- else -%}
        {{content['text']}}
      {%- endif -%}
    {%- endfor -%}
    {{'<|im_end|>'}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{'<|im_assistant|>assistant<|im_middle|>'}}
{%- endif -%}"""
