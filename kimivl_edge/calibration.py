"""Calibration chats for ``kimivl-edge imatrix``: a default set built at run time (nothing stored but these
templates), or the user's JSONL file.

The default set: 8 languages x 8 question templates x 5 topics = 320 text prompts, then one image chat for every
fourth of them (80): a generated picture (``verify.default_image``: a colour gradient with rectangles and discs,
seeded by its index) at one of five sizes that need resizing or padding, asked about in the prompt's language.
The same set comes out every time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError
from .prompt import user_message

# language -> (question templates with a {t} slot, topics, image questions)
_LANGUAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "en": (("Explain {t} in two sentences.", "What is the history of {t}?", "Write a short poem about {t}.",
            "List three facts about {t}.", "Why do people care about {t}?", "How would you teach {t} to a child?",
            "Give an example that involves {t}.", "What are common mistakes about {t}?"),
           ("the sea", "photosynthesis", "the printing press", "prime numbers", "coffee"),
           ("Describe this image.", "What shapes and colours do you see?")),
    "zh": (("请用两句话解释{t}。", "{t}的历史是什么？", "写一首关于{t}的短诗。", "列出关于{t}的三个事实。",
            "为什么人们关心{t}？", "你会怎样向孩子解释{t}？", "举一个与{t}有关的例子。", "关于{t}有哪些常见误解？"),
           ("长城", "光合作用", "围棋", "茶", "火车"),
           ("请描述这张图片。", "图中有哪些形状和颜色？")),
    "fr": (("Explique {t} en deux phrases.", "Quelle est l'histoire de {t} ?", "Écris un court poème sur {t}.",
            "Donne trois faits sur {t}.", "Pourquoi s'intéresse-t-on à {t} ?",
            "Comment expliquer {t} à un enfant ?", "Donne un exemple lié à {t}.",
            "Quelles erreurs fait-on souvent sur {t} ?"),
           ("la mer", "la photosynthèse", "l'imprimerie", "le café", "les volcans"),
           ("Décris cette image.", "Quelles formes et couleurs vois-tu ?")),
    "de": (("Erkläre {t} in zwei Sätzen.", "Was ist die Geschichte von {t}?", "Schreib ein kurzes Gedicht über {t}.",
            "Nenne drei Fakten über {t}.", "Warum interessieren sich Menschen für {t}?",
            "Wie würdest du {t} einem Kind erklären?", "Gib ein Beispiel für {t}.",
            "Welche Irrtümer über {t} sind häufig?"),
           ("die Nordsee", "Fotosynthese", "den Buchdruck", "Primzahlen", "die Eisenbahn"),
           ("Beschreibe dieses Bild.", "Welche Formen und Farben siehst du?")),
    "es": (("Explica {t} en dos frases.", "¿Cuál es la historia de {t}?", "Escribe un poema corto sobre {t}.",
            "Enumera tres datos sobre {t}.", "¿Por qué a la gente le importa {t}?",
            "¿Cómo le explicarías {t} a un niño?", "Da un ejemplo relacionado con {t}.",
            "¿Qué errores comunes hay sobre {t}?"),
           ("el mar", "la fotosíntesis", "la imprenta", "el café", "los volcanes"),
           ("Describe esta imagen.", "¿Qué formas y colores ves?")),
    "ja": (("{t}を二文で説明してください。", "{t}の歴史は何ですか？", "{t}についての短い詩を書いてください。",
            "{t}について三つの事実を挙げてください。", "なぜ人々は{t}に関心を持つのですか？",
            "子供に{t}をどう説明しますか？", "{t}に関する例を挙げてください。", "{t}についてよくある誤解は何ですか？"),
           ("富士山", "光合成", "印刷機", "素数", "お茶"),
           ("この画像を説明してください。", "どんな形と色が見えますか？")),
    "ru": (("Объясни {t} в двух предложениях.", "Какова история темы «{t}»?", "Напиши короткое стихотворение про {t}.",
            "Назови три факта про {t}.", "Почему людям интересно {t}?", "Как объяснить {t} ребёнку?",
            "Приведи пример, связанный с темой «{t}».", "Какие ошибки часто делают про {t}?"),
           ("море", "фотосинтез", "книгопечатание", "простые числа", "чай"),
           ("Опиши это изображение.", "Какие фигуры и цвета ты видишь?")),
    "hi": (("{t} को दो वाक्यों में समझाइए।", "{t} का इतिहास क्या है?", "{t} पर एक छोटी कविता लिखिए।",
            "{t} के बारे में तीन तथ्य बताइए।", "लोग {t} की परवाह क्यों करते हैं?", "आप बच्चे को {t} कैसे समझाएँगे?",
            "{t} से जुड़ा एक उदाहरण दीजिए।", "{t} के बारे में आम गलतफहमियाँ क्या हैं?"),
           ("समुद्र", "प्रकाश संश्लेषण", "छापाखाना", "अभाज्य संख्याएँ", "चाय"),
           ("इस चित्र का वर्णन कीजिए।", "आपको कौन-सी आकृतियाँ और रंग दिखते हैं?")),
}
IMAGE_EVERY = 4  # one image chat per this many text prompts
IMAGE_SIZES = ((224, 224), (336, 252), (150, 400), (448, 336), (61, 47))  # (width, height)


@dataclass
class Chat:
    """One calibration chat: its messages, and whether it holds images (skipped without an mmproj)."""

    name: str
    messages: list[dict]
    n_images: int = 0
    images: list[Any] = field(default_factory=list, repr=False)


def default_prompts() -> list[str]:
    """The 320 text prompts, language by language."""
    return [q.format(t=t) for qs, topics, _ in _LANGUAGES.values() for q in qs for t in topics]


def default_chats() -> list[Chat]:
    """The default set: every text prompt, and after every ``IMAGE_EVERY``-th one an image chat."""
    from .verify import default_image

    chats: list[Chat] = []
    langs = [(lang, img_qs) for lang, (qs, topics, img_qs) in _LANGUAGES.items() for _ in range(len(qs) * len(topics))]
    for k, (text, (lang, img_qs)) in enumerate(zip(default_prompts(), langs)):
        chats.append(Chat(f"{lang} prompt {k + 1}", [user_message(text)]))
        if k % IMAGE_EVERY == IMAGE_EVERY - 1:
            n = k // IMAGE_EVERY
            w, h = IMAGE_SIZES[n % len(IMAGE_SIZES)]
            img = default_image(w, h, seed=n)
            chats.append(Chat(f"{lang} image {n + 1} ({w}x{h})", [user_message(img_qs[n % len(img_qs)], [img])], 1,
                              [img]))
    return chats


def read_chats(path: str) -> list[Chat]:
    """The user's JSONL, in ``kimivl-edge verify --prompts``'s format: one object a line,
    ``{"prompt": TEXT, "images": [PATH, ...]}`` or ``{"messages": [...]}`` (image parts as the API takes them)."""
    from .verify import read_prompts

    try:
        cases = read_prompts(path)
    except UsageError as e:  # the format has one home (verify); the option here has another name
        raise UsageError(str(e).replace("--prompts", "--calibration", 1)) from None
    return [Chat(c.name, c.messages, len(c.images), list(c.images)) for c in cases]
