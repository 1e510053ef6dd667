"""``fastebm data check RECORDS``: validate every record and decode every video, report, exit status."""
from __future__ import annotations

from fastebm.config import VideoConfig
from fastebm.data import DataError
from fastebm.data.records import parse_record, read_raw, resolve_video


def check_records(path: str, video_root: str = "", video_cfg: VideoConfig | None = None, out=None,
                  allow_outside_root: bool = False) -> bool:
    """Print a report of ``path``; True when every record parses, every ``video_path`` stays inside the
    video root (unless ``allow_outside_root``) and every video decodes."""
    from rich.console import Console

    from fastebm.data.video import VideoError, load_video_sample

    console = Console(file=out, soft_wrap=True) if out is not None else Console(soft_wrap=True)
    video_cfg = video_cfg or VideoConfig()
    bad: list[tuple[str, str]] = []
    raw = read_raw(path)
    ok_records = ok_videos = 0
    for i, obj in enumerate(raw):
        try:
            rec = parse_record(obj, path, i)
        except DataError as e:  # the message names the file, the record and the field
            bad.append(("record", str(e)))
            continue
        try:
            vpath = resolve_video(rec, video_root, allow_outside_root)
        except DataError as e:  # video_path leaves the video root
            bad.append(("record", str(e)))
            continue
        ok_records += 1
        try:
            vs = load_video_sample(vpath, video_cfg)
        except VideoError as e:  # the message names the file and the reason
            bad.append(("video", str(e)))
            continue
        ok_videos += 1
        console.print(f"ok  {vpath}  {vs.meta.codec} {vs.meta.width}x{vs.meta.height} "
                      f"{vs.meta.duration:.1f}s -> {vs.num_video_tokens} video tokens")
    console.print(f"\n{len(raw)} records: {ok_records} valid; {ok_videos} videos decoded; {len(bad)} problems")
    for kind, why in bad:
        console.print(f"[red]BAD[/red] {kind}: {why}", markup=True, highlight=False)
    return not bad
