"""The reward's language rule, its CJK handling, QMD's drop rule, and the two defects of issue 16."""

import pytest

from qmd_unsloth.reward import (analyse_query, detect_language, grpo_reward, language_of, lex_terms, qmd_drops,
                                qmd_terms, score_expansion, text_width, tokens)

# query, expansion in the query's language, the same expansion written in English
CASES = {
    "zh": ("容器 网络 配置",
           "hyde: Docker 默认创建 bridge 网络，容器之间可以通过容器名互相访问；自定义网络用 docker network create 创建。\n"
           "lex: 容器 网络\nlex: 网络 配置 bridge\nlex: 容器 互联\n"
           "vec: 如何配置 Docker 容器之间的网络通信\nvec: 自定义容器网络和默认 bridge 网络有什么区别",
           "hyde: Docker creates a default bridge network; containers on a user-defined network reach each other by name.\n"
           "lex: container network\nlex: docker network bridge\nlex: container networking setup\n"
           "vec: how do I configure networking between docker containers\n"
           "vec: what is the difference between bridge and host networks"),
    "ja": ("コンテナ ログ 確認方法",
           "hyde: docker logs コマンドでコンテナの標準出力を確認でき、-f オプションを付けるとログをリアルタイムで追跡できます。\n"
           "lex: コンテナ ログ 確認\nlex: docker logs コンテナ\nlex: ログ 出力 追跡\n"
           "vec: 実行中のコンテナのログを確認する方法\nvec: コンテナのログが表示されないときの原因と対処",
           "hyde: The docker logs command prints a container's standard output, and the -f flag follows the log live.\n"
           "lex: container logs\nlex: docker logs follow\nlex: container log output\n"
           "vec: how do I check the logs of a running container\nvec: why are my container logs empty and how to fix it"),
    "ko": ("도커 컨테이너 로그 확인",
           "hyde: docker logs 명령으로 컨테이너의 표준 출력을 볼 수 있고, -f 옵션을 붙이면 로그를 실시간으로 따라갈 수 있습니다.\n"
           "lex: 도커 컨테이너 로그\nlex: docker logs 확인\nlex: 컨테이너 로그 실시간\n"
           "vec: 실행 중인 도커 컨테이너의 로그를 확인하는 방법\nvec: 컨테이너 로그가 보이지 않을 때 해결 방법",
           "hyde: The docker logs command prints a container's standard output, and the -f flag follows the log live.\n"
           "lex: docker container logs\nlex: docker logs follow\nlex: container log output\n"
           "vec: how do I check the logs of a running docker container\nvec: why are my container logs empty and how to fix it"),
    "ru": ("настройка nginx обратный прокси",
           "hyde: В nginx обратный прокси задаётся директивой proxy_pass в блоке location, а заголовки передаются через "
           "proxy_set_header.\n"
           "lex: nginx обратный прокси\nlex: nginx proxy_pass настройка\nlex: nginx proxy_set_header заголовки\n"
           "vec: как настроить nginx как обратный прокси для приложения\n"
           "vec: какие заголовки nginx передаёт бэкенду при проксировании",
           "hyde: In nginx a reverse proxy is set up with proxy_pass inside a location block, and headers go through "
           "proxy_set_header.\n"
           "lex: nginx reverse proxy\nlex: nginx proxy_pass config\nlex: nginx proxy_set_header headers\n"
           "vec: how do I set up nginx as a reverse proxy for my app\n"
           "vec: which headers does nginx pass to the backend when proxying"),
    "de": ("docker volumes sichern",
           "hyde: Ein Docker Volume sichert man, indem ein temporärer Container das Volume einbindet und ein tar-Archiv "
           "schreibt.\n"
           "lex: docker volume backup tar\nlex: docker volumes sichern host\nlex: docker volume wiederherstellen\n"
           "vec: wie sichere ich ein docker volume auf den host\n"
           "vec: docker volumes vor einem update sichern und wiederherstellen",
           "hyde: To back up a Docker volume, run a temporary container that mounts the volume and writes a tar archive.\n"
           "lex: docker volume backup tar\nlex: docker volumes backup\nlex: docker volume restore\n"
           "vec: how do I back up a docker volume to the host\n"
           "vec: backing up and restoring docker volumes before an upgrade"),
    "fr": ("sauvegarder base postgresql",
           "hyde: pg_dump crée une sauvegarde cohérente d'une base PostgreSQL sans bloquer les écritures ; pg_restore "
           "la recharge.\n"
           "lex: postgresql pg_dump sauvegarde\nlex: sauvegarder postgresql serveur\nlex: postgresql pg_restore\n"
           "vec: comment sauvegarder une base postgresql avec pg_dump\n"
           "vec: restaurer une sauvegarde postgresql sur un autre serveur",
           "hyde: pg_dump makes a consistent backup of a PostgreSQL database without blocking writes, and pg_restore "
           "loads it.\n"
           "lex: postgresql pg_dump backup\nlex: postgresql database backup\nlex: postgresql pg_restore\n"
           "vec: how do I back up a postgresql database with pg_dump\nvec: restoring a postgresql backup on another server"),
}


# --- the two defects ------------------------------------------------------------------------------------------------

def test_expansion_that_drops_the_named_entity_scores_at_most_half():
    c = "lex: find information about\nlex: company details\nvec: who is this company and what do they do"
    s = score_expansion("who is TDS motorsports", c)
    assert s.score <= 0.5, s.reasons
    assert any("entity cap: no line keeps any of the query's entities ['tds']" in r for r in s.reasons)
    # the same shape keeping the entity is not capped
    kept = "lex: TDS motorsports team\nlex: TDS racing company\nvec: who is TDS motorsports and what do they do"
    assert score_expansion("who is TDS motorsports", kept).score > 0.6


@pytest.mark.parametrize("completion", [
    # perfect lines of one kind, with and without a hyde passage
    "hyde: Docker volumes live under /var/lib/docker/volumes and persist data after a container is removed.\n"
    "lex: docker volumes\nlex: docker volume mount persist\nlex: docker volume backup",
    "lex: docker volumes\nlex: docker volume mount persist\nlex: docker volume backup",
    "hyde: Docker volumes live under /var/lib/docker/volumes and persist data after a container is removed.\n"
    "vec: how do docker volumes keep data between container restarts\n"
    "vec: difference between bind mounts and named docker volumes",
])
def test_missing_a_required_kind_cannot_be_excellent(completion):
    s = score_expansion("docker volume persistence", completion)
    assert s.rating != "Excellent" and s.score < 0.8, s.reasons
    assert any("only one kind of search line" in r for r in s.reasons)


# --- language consistency -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("lang", sorted(CASES))
@pytest.mark.parametrize("tagged", [True, False])
def test_same_language_expansion_is_excellent_and_english_one_loses_clearly(lang, tagged):
    query, native, english = CASES[lang]
    tag = lang if tagged else None
    good = score_expansion(query, native, tag)
    assert good.rating == "Excellent" and good.score >= 0.95, good.reasons
    assert good.lines_in_language == good.lines_judged == 6
    if not tagged and lang in ("de", "fr"):
        # a keyword query of a Latin-script language cannot be told from English without its tag: no judgement
        assert detect_language(query) == ""
        return
    bad = score_expansion(query, english, tag)
    assert bad.lines_in_language == 0 and bad.lang == lang
    assert any("not in the query's language" in r for r in bad.reasons)
    if lang in ("de", "fr"):
        # an English translation of a Latin-script query that drops the query's own words ("sichern", "sauvegarder",
        # "base") loses by the share of them it drops (see test_english_lines_keeping_the_querys_words_...)
        assert bad.score <= good.score - 0.25 and bad.rating != "Excellent", bad.reasons
        return
    assert bad.rating in ("Poor", "Failed") and bad.score < 0.31, bad.reasons


def test_one_english_line_costs_part_of_the_score():
    query, native, _ = CASES["zh"]
    one_off = native.replace("vec: 自定义容器网络和默认 bridge 网络有什么区别",
                             "vec: what is the difference between a custom and the default bridge network")
    s = score_expansion(query, one_off)
    assert 0.8 < s.score < 0.9 and s.lines_in_language == 5, s.reasons


def test_identifiers_names_and_numbers_do_not_count_as_another_language():
    query = "Docker 容器 网络"
    c = ("hyde: 在 docker-compose.yml 里给服务指定 networks，Docker 会为容器分配 172.18.0.0/16 网段内的地址。\n"
         "lex: Docker 容器 网络 bridge\nlex: Docker docker-compose.yml networks 配置\nlex: Docker 网络 驱动\n"
         "vec: 如何让两个 Docker 容器通过网络互相访问\nvec: Docker 容器网络和宿主机网络有什么区别")
    s = score_expansion(query, c)
    assert s.rating == "Excellent" and s.lines_in_language == s.lines_judged, s.reasons
    # names in a Russian sentence are not English words
    ru = "как установить Visual Studio Code и Node.js на Ubuntu 24.04"
    assert score_expansion("установка vscode", f"lex: установка vscode ubuntu\nlex: vscode node.js\nvec: {ru}",
                           "ru").lines_in_language == 3


def test_mixed_query_keeps_its_english_term_in_every_line():
    query = "Docker 容器 网络"
    assert qmd_terms(query) == ("docker",)
    c = ("lex: Docker 容器 网络\nlex: 容器 网络 驱动\n"
         "vec: 如何让两个 Docker 容器互相访问\nvec: 容器网络和宿主机网络有什么区别")
    r = " | ".join(score_expansion(query, c).reasons)
    assert "2 line(s) without any of the query's terms ['docker'] (QMD drops them)" in r
    # an English expansion keeping "docker" everywhere survives QMD's filter but loses on language
    en = ("lex: docker container network\nlex: docker bridge driver\n"
          "vec: how do two docker containers talk to each other\nvec: docker container network versus host network")
    s = score_expansion(query, en)
    assert "QMD drops" not in " ".join(s.reasons) and s.score < 0.31


def test_german_query_with_english_terms_and_german_lines():
    query = "Kubernetes Pod startet ständig neu"
    assert detect_language(query) == ""  # no function word: the row's tag decides
    c = ("hyde: Ein Pod im Zustand CrashLoopBackOff startet neu, weil der Container abstürzt; kubectl logs --previous "
         "zeigt die Ursache.\n"
         "lex: Kubernetes Pod CrashLoopBackOff\nlex: Kubernetes Pod Neustart Ursache\n"
         "vec: warum startet mein Kubernetes Pod immer wieder neu\n"
         "vec: wie finde ich die Ursache für einen Pod Neustart in Kubernetes")
    assert score_expansion(query, c, "de").rating == "Excellent"
    en = c.replace("vec: warum startet mein Kubernetes Pod immer wieder neu",
                   "vec: why does my kubernetes pod keep restarting") \
          .replace("vec: wie finde ich die Ursache für einen Pod Neustart in Kubernetes",
                   "vec: how to find the cause of a pod restart in kubernetes")
    s = score_expansion(query, en, "de")
    # hyde is German, both vec lines English: the keyword lines follow the majority of the lines that can be told
    assert (s.lines_in_language, s.lines_judged) == (1, 5), s.reasons
    assert s.score < score_expansion(query, c, "de").score - 0.3, s.reasons


@pytest.mark.parametrize("query, completion", [
    ("docker volume persistence",
     "hyde: Docker volumes live under /var/lib/docker/volumes and persist data after a container is removed.\n"
     "lex: docker volumes\nlex: docker volume mount persist\n"
     "vec: how do docker volumes keep data between container restarts\n"
     "vec: difference between bind mounts and named docker volumes"),
    ("el nino forecast",
     "lex: el nino forecast 2025\nlex: el nino noaa outlook\nvec: what is the latest el nino forecast from noaa\n"
     "vec: how does el nino change winter weather in the us"),
    ("die hard christmas movie",
     "lex: die hard christmas debate\nlex: die hard 1988 film\nvec: is die hard a christmas movie or not\n"
     "vec: why people argue about die hard being a christmas film"),
])
@pytest.mark.parametrize("lang", [None, "en"])
def test_english_expansions_are_unaffected(query, completion, lang):
    s = score_expansion(query, completion, lang)
    assert s.lines_in_language == s.lines_judged and not any("language" in r for r in s.reasons), s.reasons


def test_english_query_expanded_into_another_language_loses():
    _, native, _ = CASES["zh"]
    assert score_expansion("docker container network", native).score <= 0.4


@pytest.mark.parametrize("text, lang", [
    ("容器 网络 配置", "zh"), ("Dockerのネットワーク設定", "ja"), ("도커 네트워크 설정", "ko"), ("настройка nginx", "ru"),
    ("wie funktioniert der docker cache", "de"), ("comment configurer le serveur", "fr"),
    ("cómo configurar el servidor", "es"), ("como configurar o servidor", "pt"), ("how do I use the cache", "en"),
    ("docker volumes", ""), ("2024", ""), ('"Ich bin ein Berliner" speech', ""), ("what does 你好 mean", "en"),
])
def test_detect_language(text, lang):
    assert detect_language(text) == lang


def test_language_of_prefers_the_tag_then_detection_then_english():
    assert language_of("docker volumes") == "en"
    assert language_of("docker volumes", "de") == "de"
    assert language_of("容器 网络") == "zh"


# --- CJK: tokens, term overlap, lex spacing ------------------------------------------------------------------------

def test_cjk_runs_are_tokens_of_their_own():
    assert tokens("Docker容器网络 node.js") == ["docker", "容器网络", "node.js"]
    assert analyse_query("Docker容器 网络").entities == ("docker",)
    assert text_width("容器ab") == 6


def test_cjk_term_overlap_is_by_character_bigram():
    q = analyse_query("容器 网络 配置")
    assert q.shares_term(tokens("如何配置容器之间的通信"))  # 容器 and 配置 are bigrams of the line
    assert not q.shares_term(tokens("数据库备份策略"))
    c = CASES["zh"][1].replace("lex: 容器 互联", "lex: 数据库 备份")
    assert "1 lex/vec line(s) share no content term with the query" in " | ".join(score_expansion("容器 网络 配置", c).reasons)


@pytest.mark.parametrize("line, terms, longest", [
    ("容器 网络 配置", 3, 2), ("如何在Kubernetes中配置网络策略", 1, 12), ("データベース設定", 1, 5),
    ("docker volume backup", 3, 0),
])
def test_lex_terms_follow_qmd_fts5(line, terms, longest):
    assert lex_terms(line, tokens(line)) == (terms, longest)


def test_unspaced_cjk_lex_line_is_penalised_like_a_long_lex_line():
    query, native, _ = CASES["zh"]
    long = native.replace("lex: 容器 互联", "lex: 如何在Docker中配置容器之间的网络互联")
    r = " | ".join(score_expansion(query, long).reasons)
    assert "1 lex line(s) with an unspaced CJK chunk over 6 characters" in r
    assert "CJK chunk" not in " | ".join(score_expansion(query, native).reasons)


# --- QMD's drop rule, mirrored -------------------------------------------------------------------------------------

@pytest.mark.parametrize("query, terms", [
    ("Docker 容器 网络", ("docker",)), ("容器 网络", ()), ("настройка nginx", ("nginx",)),
    ("Zürich café", ("z", "rich", "caf")), ("C++ node.js", ("c", "node", "js")), ("who is TDS", ("who", "is", "tds")),
])
def test_qmd_terms_mirror_qmd(query, terms):
    assert qmd_terms(query) == terms


def test_qmd_drops_is_a_substring_test_and_drops_nothing_without_terms():
    assert not qmd_drops("Kubernetes volumes", ("volume",))  # substring, case folded
    assert qmd_drops("kubernetes deployment", ("kubernets", "deploymnt"))
    assert not qmd_drops("anything at all", ())


def test_grpo_reward_takes_the_lang_column():
    query, _, english = CASES["de"]
    tagged, untagged = grpo_reward([english, english], query=[query, query], lang=["de", ""])
    assert tagged < untagged - 0.25
    query, _, english = CASES["zh"]
    tagged, = grpo_reward([english], query=[query], lang=["zh"])
    assert tagged < 0.31


@pytest.mark.parametrize("query, lang, line", [
    # SQL in backticks is code, not English
    ("mysql exportar tabla csv", "es", "`SELECT * FROM clientes INTO OUTFILE '/tmp/c.csv' FIELDS TERMINATED BY ','` "
                                       "exporta la tabla en MySQL"),
    ("festivos Madrid", "es", "calendario laboral de festivos en la Comunidad de Madrid"),  # not French
    ("finiquito despido", "es", "diferencia entre finiquito e indemnización por despido"),  # not Portuguese
    ("nginx редирект на https", "ru", "Редирект в nginx: server { listen 80; return 301 https://$host$request_uri; }"),
    ("docker контейнер не запускается", "ru", "Docker logs контейнер"),  # a capitalised Latin word is a name
])
def test_real_lines_are_not_false_positives(query, lang, line):
    s = score_expansion(query, f"lex: {query}\nvec: {line}", lang)
    assert s.lines_in_language == s.lines_judged == 2, s.reasons


def test_german_capitalised_nouns_are_not_entities():
    assert analyse_query("Umzug Checkliste Nachsendeauftrag", "de").entities == ()
    assert analyse_query("Umzug Checkliste Nachsendeauftrag").entities == ("umzug", "checkliste", "nachsendeauftrag")
    assert analyse_query("Fehler 0x80070005 Windows Update", "de").entities == ("0x80070005",)


@pytest.mark.parametrize("query, line", [
    ("European Commission", "lex: European Commission von der Leyen"),  # name particles
    ('"Ich bin ein Berliner" speech', 'lex: "Ich bin ein Berliner" Kennedy'),  # a quotation
    ('"Ich bin ein Berliner" speech', "vec: why kennedy said ich bin ein berliner in his 1963 speech"),  # own words
    ("el nino", "lex: el nino la nina"),  # the query's own words
    ("wine notes", "hyde: Wine notes: 2021 Albariño (Pazo Señorans) - saline, citrus, 9/10, great with pizza."),  # names
])
def test_names_quotes_and_the_querys_words_do_not_make_an_english_line_foreign(query, line):
    s = score_expansion(query, line, "en")
    assert s.lines_in_language == s.lines_judged == 1, s.reasons


# --- issue 23.6: Latin-script queries, English lines that carry the query's own words ----------------------------------

# query, lang, a native expansion, an English expansion whose every line carries every content word of the query
LATIN = {
    "de": ("docker volumes sichern", "de",
           "hyde: Ein Docker Volume sichert man, indem ein temporärer Container das Volume einbindet und ein "
           "tar-Archiv schreibt.\n"
           "lex: docker volume backup tar\nlex: docker volumes sichern host\nlex: docker volume wiederherstellen\n"
           "vec: wie sichere ich ein docker volume auf den host\n"
           "vec: docker volumes vor einem update sichern und wiederherstellen",
           "hyde: To sichern Docker volumes, run a temporary container that mounts the volumes and writes a tar "
           "archive.\n"
           "lex: docker volumes sichern tar\nlex: docker volumes sichern host\nlex: docker volumes sichern restore\n"
           "vec: how do I sichern docker volumes to the host\n"
           "vec: sichern and restore docker volumes before an upgrade"),
    "fr": ("sauvegarder base postgresql", "fr",
           "hyde: pg_dump crée une sauvegarde cohérente d'une base PostgreSQL sans bloquer les écritures ; pg_restore "
           "la recharge.\n"
           "lex: postgresql pg_dump sauvegarde\nlex: sauvegarder postgresql serveur\nlex: postgresql pg_restore\n"
           "vec: comment sauvegarder une base postgresql avec pg_dump\n"
           "vec: restaurer une sauvegarde postgresql sur un autre serveur",
           "hyde: pg_dump can sauvegarder a PostgreSQL base without blocking writes, and pg_restore loads it back.\n"
           "lex: sauvegarder base postgresql pg_dump\nlex: sauvegarder base postgresql cron\n"
           "lex: postgresql base sauvegarder restore\n"
           "vec: how to sauvegarder a postgresql base with pg_dump\n"
           "vec: restore a sauvegarder of a postgresql base on another server"),
    "es": ("copia seguridad mysql", "es",
           "hyde: mysqldump genera una copia de seguridad lógica de MySQL; con --single-transaction no bloquea las "
           "tablas InnoDB.\n"
           "lex: copia seguridad mysql mysqldump\nlex: mysql copia seguridad automática\nlex: mysql restaurar copia\n"
           "vec: cómo hacer una copia de seguridad de mysql con mysqldump\n"
           "vec: restaurar una copia de seguridad de mysql en otro servidor",
           "hyde: mysqldump writes a logical copia seguridad of MySQL; with --single-transaction it does not lock the "
           "InnoDB tables.\n"
           "lex: copia seguridad mysql mysqldump\nlex: mysql copia seguridad cron\nlex: mysql copia seguridad restore\n"
           "vec: how to make a mysql copia seguridad with mysqldump\n"
           "vec: restore a mysql copia seguridad on another server"),
    "pt": ("backup banco postgres", "pt",
           "hyde: O pg_dump gera um backup consistente do banco Postgres sem bloquear as escritas; o pg_restore o "
           "recarrega.\n"
           "lex: backup banco postgres pg_dump\nlex: postgres backup automático\nlex: banco postgres restaurar\n"
           "vec: como fazer backup do banco postgres com pg_dump\n"
           "vec: restaurar o backup de um banco postgres em outro servidor",
           "hyde: pg_dump makes a consistent backup of the Postgres banco without blocking writes, and pg_restore "
           "loads it.\n"
           "lex: backup banco postgres pg_dump\nlex: backup banco postgres cron\nlex: banco postgres backup restore\n"
           "vec: how to backup a postgres banco with pg_dump\n"
           "vec: restore a backup of the postgres banco on another server"),
}
MARGIN = 0.05  # an English expansion carrying the query's words scores within this of the native one


@pytest.mark.parametrize("lang", sorted(LATIN))
def test_english_lines_keeping_the_querys_words_score_almost_as_high_as_native(lang):
    query, tag, native, english = LATIN[lang]
    good = score_expansion(query, native, tag)
    assert good.rating == "Excellent" and good.lines_in_language == good.lines_judged, good.reasons
    en = score_expansion(query, english, tag)
    assert en.lines_in_language < en.lines_judged  # still judged English ...
    assert en.rating == "Excellent" and en.score >= good.score - MARGIN, (good.score, en.score, en.reasons)  # ... cheaply
    assert any("they carry the query's words" in r for r in en.reasons), en.reasons
    # the same English lines with the query's own words swapped for English ones lose clearly
    terms = [t for t in analyse_query(query, tag).terms if t not in ("docker", "postgresql", "mysql", "postgres")]
    translated = english
    for t in terms:
        translated = translated.replace(t, "data")
    lost = score_expansion(query, translated, tag)
    assert lost.score < en.score - 0.2, (en.score, lost.score, lost.reasons)


def test_a_lines_language_is_judged_on_the_words_that_are_not_the_querys():
    q = "wie sichere ich die docker volumes"  # German by its function words (wie, ich, die)
    assert detect_language(q) == "de"
    # all the query's words plus English ones: English, though the query's German words outvote them
    en_line = "vec: wie sichere ich die docker volumes to the host"
    de_line = "vec: wie sichere ich die docker volumes auf dem host"
    lex = "lex: sichere docker volumes tar\n"
    assert score_expansion(q, lex + de_line, "de").lines_in_language == 2
    s = score_expansion(q, lex + en_line, "de")
    assert s.lines_in_language == 0, s.reasons  # the keyword line follows the told line
    # ... and it costs little: both lines carry the query's own words
    assert s.score >= score_expansion(q, lex + de_line, "de").score - MARGIN, s.reasons


@pytest.mark.parametrize("lang", ["zh", "ru"])
def test_cjk_and_cyrillic_queries_expanded_into_english_are_penalised_as_before(lang):
    query, native, english = CASES[lang]
    # English lines carrying the query's Latin words (nginx) or nothing of it: no relief for another script
    s = score_expansion(query, english, lang)
    assert s.score < 0.31 and "carry the query's words" not in " ".join(s.reasons), s.reasons
    assert score_expansion(query, native, lang).score >= 0.95
