"""How far a count with another tokenizer is from a model's own: DeepSeek text counted with
OpenAI's encodings.

Usage: python bench/tokenizer_tolerance.py TOKENIZER_DIR

TOKENIZER_DIR holds `deepseek_tokenizer.json`, `cl100k_base.tiktoken` and
`o200k_base.tiktoken`. The sample corpus is this project's own English documentation, its
Python source, and the Chinese paragraphs below; each document is counted with DeepSeek's
tokenizer and with each encoding, and the ratio encoding/DeepSeek is printed per kind of text
(over the whole kind, and the lowest and highest document).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.tokens import TokenCounter, TokenizerConfig

ROOT = Path(__file__).resolve().parent.parent
DEEPSEEK_FILE = "deepseek_tokenizer.json"

CHINESE = [
    "杭州是浙江省的省会，位于中国东南沿海，以西湖的自然风光和悠久的历史文化闻名于世。",
    "请用三句话总结这篇文章的主要观点，并指出作者在论证过程中使用的两个例子。",
    "机器学习模型的训练需要大量的数据和计算资源，因此云服务商会按照使用的令牌数量收费。",
    "今天的天气预报说下午有雷阵雨，出门的时候记得带伞，路上注意安全。",
    "这家公司的季度财报显示，营业收入同比增长百分之十八，净利润率略有下降。",
    "在分布式系统中，一致性、可用性和分区容错性三者不可兼得，这就是著名的CAP定理。",
    "他把这首唐诗翻译成了英文，尽量保留原文的韵律和意境，读起来很有味道。",
    "如果你在安装过程中遇到权限错误，请先检查当前用户是否属于管理员组，然后重新运行安装命令。",
    "长江是中国第一长河，全长约六千三百公里，流经十一个省级行政区，最后注入东海。",
    "我们计划下个月在上海举办开发者大会，届时将发布新版本的接口和配套的开发工具。",
]


def corpus() -> dict[str, list[str]]:
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    code = sorted((ROOT / "gateway").glob("*.py")) + sorted((ROOT / "billing").glob("*.py"))
    return {
        "English prose (docs)": [p.read_text() for p in docs],
        "Python source": [text for p in code if (text := p.read_text()).strip()],
        "Chinese": CHINESE,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dir", type=Path)
    args = parser.parse_args()
    counter = TokenCounter(
        TokenizerConfig.model_validate(
            {"dir": args.dir, "models": {"deepseek": {"tokenizer_json": DEEPSEEK_FILE}}}
        )
    )
    if counter.tokenizer_label("deepseek") != DEEPSEEK_FILE:
        raise SystemExit(f"{DEEPSEEK_FILE} not found in {args.dir}")

    def counting(model: str) -> Callable[[str], int]:
        return lambda text: counter.count_text(model, text)

    reference = counting("deepseek")
    print(f"{'text':<22} {'encoding':<12} {'tokens':>8} {'deepseek':>9} {'ratio':>6}  per document")
    for kind, texts in corpus().items():
        own = [reference(t) for t in texts]
        for encoding, model in (("cl100k_base", "gpt-4"), ("o200k_base", "gpt-4o")):
            other = [counting(model)(t) for t in texts]
            ratios = [o / d for o, d in zip(other, own, strict=True)]
            print(
                f"{kind:<22} {encoding:<12} {sum(other):>8} {sum(own):>9} "
                f"{sum(other) / sum(own):>6.3f}  {min(ratios):.3f}-{max(ratios):.3f}"
            )


if __name__ == "__main__":
    main()
