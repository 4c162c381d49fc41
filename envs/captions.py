"""Captioned JAX tasks: a NetHack-style message for every step, computed inside ``jit``.

LLM-feedback methods (ONI) score the game's messages; NetHack has them, JAX gridworlds do not. For a captioned task
:func:`envs.make` wraps the base env in :class:`Captioned`, which puts ``info["message_id"]`` (int32, ``0`` = no
message) in every step's info. The id is a function of the transition only (state before, the action the env
executed, state after), never of the reward, and is computed before the auto-reset, so the step that ends an episode
carries its message too. It flows through :class:`~envs.wrappers.AutoReset` / ``EpisodeStats`` (per env, not
averaged) into :attr:`jaxrl_pref.rollout.Transition.info`.

A task may name *farmable* captions (``Captions(..., farmable=(text, ...))``): repeatable, useless events an annotator
may like (``KeyDoorLever-*``'s lever). Its :class:`Captioned` steps then also carry ``info["hack"]`` (float32, 1 on a
step whose caption is farmable), which :func:`jaxrl_pref.rollout.episode_metrics` logs as ``hack_frac``, the fraction
of the rollout's steps spent on them: the hack meter.

A task is captioned when its registry entry has a :class:`Captions` (its caption function and texts), so a new
captioned task is one registration plus its caption function (and the annotator's prompt file ``task``):
``envs.register(name, factory, captions=Captions("family", lambda: TEXTS, caption_fn), task="family")``.
The texts are a static table per task family (:func:`caption_table`): ``table.texts[0] == ""``, ``table.bytes``
is ``encode_messages(table.texts)`` (``uint8[K, 256]``, the NetHack message form that ONI's reward models read), and
in ``jit`` ``table.device()[message_id]`` gives a step's message bytes.

==========================  =================================================================================
task family                 captions
==========================  =================================================================================
``KeyDoor-{5,7,9}``         ``It's solid stone.`` (the grid's edge), ``It's a wall.``, ``This door is locked.``
                            (bumping the door without the key), ``You pick up the key.``, ``The door opens.``
                            (entering the door with the key), ``You reach the goal.``
``KeyDoorLever-{5,9}``      KeyDoor's six, then ``You pull the lever. Somewhere in the wall, a door clicks.``
                            (moving into the lever in the wall: every pull, nothing changes). That caption is the
                            task's farmable one: ``info["hack"]`` is 1 on the steps that carry it.
``MiniGrid-*`` (xminigrid)  forward: ``It's a wall.``, ``This door is locked.``, ``The door is closed.``,
                            ``There is a {c} {o} in your way.``, ``You step into the {c} doorway.``,
                            ``You reach the {c} goal square.``; pick up: ``You pick up a {c} {o}.``,
                            ``Your hands are full.``, ``There is nothing here to pick up.``; drop:
                            ``You drop the {c} {o}.``, ``You don't have anything to drop.``,
                            ``There is no room to drop that here.``; toggle: ``You unlock the {c} door.``,
                            ``This door is locked.``, ``The {c} door opens.``, ``The {c} door closes.``,
                            ``You see no door there.``; turning: none. ``{o}`` over xminigrid's 6 pickable
                            objects, ``{c}`` over its 11 colours.
``Craftax-Classic-*``       one id a step, the first of these that applies (the caption priority):
(Symbolic and Pixels: one   (1) an achievement unlocked on this step: one caption per achievement, derived from
table of 42 captions);      its name in craftax's ``Achievement`` enum (``You collect wood.``, ``You place a
``Craftax-*`` (full         crafting table.``, ``You make a wood pickaxe.``, ``You defeat a zombie.``, ``You
Craftax: 91, same rules)    drink water.``, ``You wake up.``...), message id = achievement index + 1; several on
                            one step: the lowest index. (2) health fell: ``You die.`` (health <= 0, the
                            episode's last step) or ``You are hurt.``. (3) an inventory count rose: ``You now have
                            more {item}.`` (Classic: wood, stone, coal, iron, diamonds, saplings,
                            {wood,stone,iron} {pickaxes,swords}; full Craftax: also arrows, torches, rubies,
                            sapphires, potions, books, and ``You now have a better pickaxe.`` / ``... a better
                            sword.`` / ``... better armour.`` / ``... a bow.``); several: the first in craftax's
                            ``Inventory`` field order. (4) food, else drink, rose: ``You feel less hungry.`` /
                            ``You feel less thirsty.``. (5) food / drink / energy fell to 0 on this step (first
                            in that order): ``You are very hungry.`` / ``You are very thirsty.`` / ``You are
                            very tired.``. Else none. An achievement unlocks once per episode: a repeat (a second
                            cow eaten, a second table placed) says only what (2)-(5) see.
==========================  =================================================================================
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from envs import registry
from envs.messages import MESSAGE_LEN, encode_messages

__all__ = ["Captioned", "Captions", "CaptionTable", "caption_table", "captions_of", "is_captioned", "wrap",
           "message_bytes", "KEYDOOR", "KEYDOOR_LEVER", "MINIGRID", "CRAFTAX_CLASSIC", "CRAFTAX"]



@dataclasses.dataclass(frozen=True)
class CaptionTable:
    """The static caption texts of a task: ``texts[i]`` is message id ``i`` (``texts[0] == ""``, no message)."""
    texts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    @functools.cached_property
    def bytes(self) -> np.ndarray:
        """``uint8[K, 256]``: ``encode_messages(texts)``, NUL-padded (the NetHack message form)."""
        out = encode_messages(self.texts, MESSAGE_LEN)
        out.setflags(write=False)
        return out

    def device(self) -> jax.Array:
        """The byte table as a JAX array: ``table.device()[message_id]`` is a step's message inside ``jit``."""
        return jnp.asarray(self.bytes)

    def id(self, text: str) -> int:
        """The message id of ``text`` (``ValueError`` if it is not a caption of this task)."""
        return self._ids[text]

    @functools.cached_property
    def _ids(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.texts)}

    def text(self, message_id) -> str:
        return self.texts[int(message_id)]


def message_bytes(table_bytes: jax.Array, message_id: jax.Array) -> jax.Array:
    """``uint8[..., 256]`` message bytes of ``message_id`` (any shape) from ``table.device()``; jittable."""
    return jnp.take(table_bytes, jnp.asarray(message_id, jnp.int32), axis=0)


# -- KeyDoor ------------------------------------------------------------------------------------------------------

KEYDOOR_TEXTS = ("", "It's solid stone.", "It's a wall.", "This door is locked.", "You pick up the key.",
                 "The door opens.", "You reach the goal.")
_KD = {t: i for i, t in enumerate(KEYDOOR_TEXTS)}


def _keydoor_caption(env, key, state, action, new_state, params) -> jax.Array:
    """``env``: the (possibly wrapped) :class:`envs.sparse.KeyDoor`; ``key``: the key its ``step_env`` got, so a
    slipped move is captioned as the move made, not the one chosen."""
    act = env.executed_action(key, action, params)
    target = state.pos + env.DIRS[act]
    inside = jnp.all((target >= 0) & (target < env.size))
    on_wall = target[1] == env.wall_col
    at_door = on_wall & (target[0] == env.door_row)
    moved = jnp.any(new_state.pos != state.pos)
    goal = jnp.all(new_state.pos == env.goal_pos)
    msg = jnp.where(moved & at_door, _KD["The door opens."], 0)
    msg = jnp.where(goal, _KD["You reach the goal."], msg)
    msg = jnp.where(~state.has_key & new_state.has_key, _KD["You pick up the key."], msg)
    msg = jnp.where(on_wall & ~moved, jnp.where(at_door, _KD["This door is locked."], _KD["It's a wall."]), msg)
    msg = jnp.where(~inside, _KD["It's solid stone."], msg)
    return msg.astype(jnp.int32)


LEVER_TEXT = "You pull the lever. Somewhere in the wall, a door clicks."
KEYDOOR_LEVER_TEXTS = KEYDOOR_TEXTS + (LEVER_TEXT,)  # KeyDoor's ids unchanged, the lever's last


def _keydoor_lever_caption(env, key, state, action, new_state, params) -> jax.Array:
    """KeyDoor's captions, except that a move into the lever (:class:`envs.sparse.KeyDoorLever`, set into the wall)
    says :data:`LEVER_TEXT` instead of ``It's a wall.``."""
    msg = _keydoor_caption(env, key, state, action, new_state, params)
    pulled = env.pulls_lever(state, env.executed_action(key, action, params))
    return jnp.where(pulled, len(KEYDOOR_TEXTS), msg).astype(jnp.int32)


# -- xminigrid MiniGrid -------------------------------------------------------------------------------------------

# xminigrid.core.constants: Tiles / Colors enums (fixed by its grid encoding, [tile, colour] per cell)
_T_EMPTY, _T_FLOOR, _T_WALL, _T_BALL, _T_SQUARE, _T_PYRAMID, _T_GOAL, _T_KEY = range(8)
_T_LOCKED, _T_CLOSED, _T_OPEN, _T_HEX, _T_STAR = range(8, 13)
_NUM_TILES, _NUM_COLORS = 13, 12
_OBJECTS = {_T_BALL: "ball", _T_SQUARE: "square", _T_PYRAMID: "pyramid", _T_KEY: "key", _T_HEX: "hexagon",
            _T_STAR: "star"}  # xminigrid's PICKABLE tiles
_COLORS = {1: "red", 2: "green", 3: "blue", 4: "purple", 5: "yellow", 6: "grey", 7: "black", 8: "orange",
           9: "white", 10: "brown", 11: "pink"}
_MG_FIXED = ("It's a wall.", "This door is locked.", "The door is closed.", "There is nothing here to pick up.",
             "Your hands are full.", "You don't have anything to drop.", "There is no room to drop that here.",
             "You see no door there.")
_MG_PER_COLOR = ("You unlock the {c} door.", "The {c} door opens.", "The {c} door closes.",
                 "You step into the {c} doorway.", "You reach the {c} goal square.")
_MG_PER_OBJECT = ("You pick up {a} {c} {o}.", "You drop the {c} {o}.", "There is {a} {c} {o} in your way.")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _minigrid_texts() -> tuple[str, ...]:
    texts = [""] + list(_MG_FIXED)
    texts += [f.format(c=c) for f in _MG_PER_COLOR for c in _COLORS.values()]
    texts += [f.format(a=_article(c), c=c, o=o) for f in _MG_PER_OBJECT for o in _OBJECTS.values()
              for c in _COLORS.values()]
    return tuple(texts)


MINIGRID_TEXTS = _minigrid_texts()


def _tile_colour_ids(fmt: str | None = None, rows: dict[int, str] | None = None) -> np.ndarray:
    """``int32[NUM_TILES, NUM_COLORS]`` of message ids: row ``tile`` holds ``fmt`` for each colour (objects: the
    object's captions), or the fixed text ``rows[tile]``; 0 elsewhere."""
    ids = {t: i for i, t in enumerate(MINIGRID_TEXTS)}
    out = np.zeros((_NUM_TILES, _NUM_COLORS), np.int32)
    for tile, text in (rows or {}).items():
        out[tile, :] = ids[text]
    if fmt is not None:
        for c, cname in _COLORS.items():
            if "{o}" in fmt:
                for tile, o in _OBJECTS.items():
                    out[tile, c] = ids[fmt.format(a=_article(cname), c=cname, o=o)]
            else:
                out[:, c] = ids[fmt.format(c=cname)]
    return out


_MG = {t: i for i, t in enumerate(MINIGRID_TEXTS)}
_PICK = _tile_colour_ids("You pick up {a} {c} {o}.")
_DROP = _tile_colour_ids("You drop the {c} {o}.")
_BUMP = _tile_colour_ids("There is {a} {c} {o} in your way.",
                         {_T_WALL: "It's a wall.", _T_LOCKED: "This door is locked.", _T_CLOSED: "The door is closed."})
_BY_COLOUR = {f: _tile_colour_ids(f)[0] for f in _MG_PER_COLOR}  # int32[NUM_COLORS] per caption
_PICKABLE = np.isin(np.arange(_NUM_TILES), list(_OBJECTS))
_DIRECTIONS = np.array([[-1, 0], [0, 1], [1, 0], [0, -1]], np.int32)  # xminigrid.core.constants.DIRECTIONS


def _minigrid_caption(env, key, timestep, action, new_timestep, params) -> jax.Array:
    """xminigrid actions: 0 forward, 1 turn right, 2 turn left, 3 pick up, 4 drop, 5 toggle (``MiniGrid-Memory*``
    plays 3 as toggle). Detected from the grid and the agent before and after the step."""
    s, n = timestep.state, new_timestep.state
    a = jnp.asarray(action, jnp.int32)
    h, w = s.grid.shape[:2]
    pos = s.agent.position.astype(jnp.int32)
    front = jnp.clip(pos + jnp.asarray(_DIRECTIONS)[s.agent.direction], 0, jnp.array([h - 1, w - 1]))
    ft, fc = s.grid[front[0], front[1], 0].astype(jnp.int32), s.grid[front[0], front[1], 1].astype(jnp.int32)
    nt = n.grid[front[0], front[1], 0].astype(jnp.int32)
    npos = n.agent.position.astype(jnp.int32)
    ht, hc = n.grid[npos[0], npos[1], 0].astype(jnp.int32), n.grid[npos[0], npos[1], 1].astype(jnp.int32)
    moved = jnp.any(npos != pos)
    had = s.agent.pocket[0] != _T_EMPTY
    has = n.agent.pocket[0] != _T_EMPTY
    pb = s.agent.pocket.astype(jnp.int32)
    pa = n.agent.pocket.astype(jnp.int32)
    per_c = {f: jnp.asarray(v)[fc] for f, v in _BY_COLOUR.items()}  # per-colour captions of the front tile

    enter = jnp.where(ht == _T_GOAL, jnp.asarray(_BY_COLOUR["You reach the {c} goal square."])[hc],
                      jnp.where(ht == _T_OPEN, jnp.asarray(_BY_COLOUR["You step into the {c} doorway."])[hc], 0))
    forward = jnp.where(moved, enter, jnp.asarray(_BUMP)[ft, fc])
    pickup = jnp.where(~had & has, jnp.asarray(_PICK)[pa[0], pa[1]],
                       jnp.where(had & jnp.asarray(_PICKABLE)[ft], _MG["Your hands are full."],
                                 _MG["There is nothing here to pick up."]))
    drop = jnp.where(had & ~has, jnp.asarray(_DROP)[pb[0], pb[1]],
                     jnp.where(had, _MG["There is no room to drop that here."],
                               _MG["You don't have anything to drop."]))
    toggle = jnp.select(
        [(ft == _T_LOCKED) & (nt == _T_OPEN), ft == _T_LOCKED, (ft == _T_CLOSED) & (nt == _T_OPEN),
         (ft == _T_OPEN) & (nt == _T_CLOSED)],
        [per_c["You unlock the {c} door."], _MG["This door is locked."], per_c["The {c} door opens."],
         per_c["The {c} door closes."]],
        _MG["You see no door there."])
    zero = jnp.int32(0)
    msg = jnp.stack([forward, zero, zero, pickup, drop, toggle]).astype(jnp.int32)
    return msg[jnp.clip(a, 0, 5)]


# -- Craftax -------------------------------------------------------------------------------------------------------

# An achievement's caption is derived from its name in craftax's ``Achievement`` enum, "VERB_OBJECT" -> "You verb
# the object.": "a"/"an" before a countable object, nothing before a material, "the" before a unique one; the names
# that do not read as "verb + object" have their whole sentence here.
_CX_SENTENCES = {
    "collect_drink": "You drink water.", "place_table": "You place a crafting table.",
    "place_plant": "You plant a sapling.", "eat_plant": "You eat a ripe plant.", "wake_up": "You wake up.",
    "make_arrow": "You make some arrows.", "make_torch": "You make some torches.", "fire_bow": "You fire your bow.",
    "defeat_orc_solider": "You defeat an orc soldier.",  # (craftax spells it "solider")
    "learn_fireball": "You learn the fireball spell.", "learn_iceball": "You learn the iceball spell.",
    "cast_fireball": "You cast a fireball.", "cast_iceball": "You cast an iceball.",
    "place_stone": "You place a stone block.", "enchant_sword": "You enchant your sword.",
    "enchant_armour": "You enchant your armour."}
_CX_MATERIALS = {"wood", "stone", "coal", "iron", "iron armour", "diamond armour"}
_CX_UNIQUE = {"necromancer", "gnomish mines", "dungeon", "sewers", "vault", "troll mines", "fire realm", "ice realm",
              "graveyard"}
# what "You now have more {}." says of an inventory field (default: its name, spaces for "_", with an "s"); full
# Craftax's pickaxe, sword and armour are levels, the bow is had or not
_CX_ITEMS = {"wood": "wood", "stone": "stone", "coal": "coal", "iron": "iron", "ruby": "rubies",
             "arrows": "arrows", "torches": "torches", "potions": "potions", "books": "books"}
_CX_ITEM_SENTENCES = {"pickaxe": "You now have a better pickaxe.", "sword": "You now have a better sword.",
                      "armour": "You now have better armour.", "bow": "You now have a bow."}
# after the achievements and the items: health, then food / drink / energy (craftax's 0-9 intrinsics)
_CX_HURT = ("You die.", "You are hurt.")
_CX_REFRESHED = ("You feel less hungry.", "You feel less thirsty.")  # food / drink rose
_CX_EMPTY = ("You are very hungry.", "You are very thirsty.", "You are very tired.")  # food / drink / energy fell to 0
_CX_STATS = ("player_food", "player_drink", "player_energy")


def _achievement_text(name: str) -> str:
    """``"COLLECT_WOOD"`` -> ``"You collect wood."``, ``"MAKE_WOOD_PICKAXE"`` -> ``"You make a wood pickaxe."``."""
    name = name.lower()
    if name in _CX_SENTENCES:
        return _CX_SENTENCES[name]
    verb, obj = name.split("_", 1)
    obj = obj.replace("_", " ")
    det = "" if obj in _CX_MATERIALS else "the " if obj in _CX_UNIQUE else f"{_article(obj)} "
    return f"You {verb} {det}{obj}."


def _item_text(field: str) -> str:
    if field in _CX_ITEM_SENTENCES:
        return _CX_ITEM_SENTENCES[field]
    return f"You now have more {_CX_ITEMS.get(field, field.replace('_', ' ') + 's')}."


@dataclasses.dataclass(frozen=True)
class _CraftaxCaptions:
    """The caption table of Classic or full Craftax, in groups (the layout of the module docstring)."""
    achievements: tuple[str, ...]  # lower-case names, in achievement index order (craftax's Achievement values)
    items: tuple[str, ...]         # the Inventory fields, in their order

    @functools.cached_property
    def groups(self) -> dict[str, tuple[str, ...]]:
        return {"achievement": tuple(map(_achievement_text, self.achievements)), "hurt": _CX_HURT,
                "item": tuple(map(_item_text, self.items)), "refreshed": _CX_REFRESHED, "empty": _CX_EMPTY}

    @property
    def texts(self) -> tuple[str, ...]:
        return sum(self.groups.values(), ("",))

    def first(self, group: str) -> int:
        """The message id of the first caption of ``group``."""
        return 1 + sum(len(self.groups[g]) for g in itertools.takewhile(lambda name: name != group, self.groups))


@functools.lru_cache(maxsize=None)
def _craftax_captions(classic: bool) -> _CraftaxCaptions:
    name = "Craftax-Classic-Symbolic-v1" if classic else "Craftax-Symbolic-v1"
    entry = registry.find(name)
    if entry is not None and entry.requires is not None:  # the missing-package error, naming the extra
        entry.requires(name)
    if classic:
        from craftax.craftax_classic.constants import Achievement
        from craftax.craftax_classic.envs.craftax_state import Inventory
    else:
        from craftax.craftax.constants import Achievement
        from craftax.craftax.craftax_state import Inventory
    names = tuple(a.name.lower() for a in sorted(Achievement, key=lambda a: a.value))
    if [a.value for a in sorted(Achievement, key=lambda a: a.value)] != list(range(len(names))):
        raise RuntimeError("craftax's Achievement values are not 0..N-1: captions index the achievements array by them")
    return _CraftaxCaptions(names, tuple(f.name for f in dataclasses.fields(Inventory)))


def _craftax_caption(cx: _CraftaxCaptions, env, key, state, action, new_state, params) -> jax.Array:
    """One id a step, by priority: a newly unlocked achievement (the lowest index if several), health lost (``You
    die.`` at health <= 0), an inventory count risen (the first field), food then drink risen, food / drink / energy
    fallen to 0; else 0. From :class:`envs.craftax.CraftaxState` before and after the step."""
    s, n = state.env, new_state.env
    new_ach = n.achievements & ~s.achievements
    total = lambda inv, f: jnp.sum(getattr(inv, f))  # noqa: E731  (full Craftax: armour and potions are arrays)
    gained = jnp.stack([total(n.inventory, f) > total(s.inventory, f) for f in cx.items])
    refreshed = jnp.stack([getattr(n, f) > getattr(s, f) for f in _CX_STATS[:2]])
    emptied = jnp.stack([(getattr(n, f) <= 0) & (getattr(s, f) > 0) for f in _CX_STATS])
    first = lambda flags, group: cx.first(group) + jnp.argmax(flags)  # noqa: E731
    msg = jnp.select(
        [new_ach.any(), n.player_health < s.player_health, gained.any(), refreshed.any(), emptied.any()],
        [first(new_ach, "achievement"), cx.first("hurt") + (n.player_health > 0), first(gained, "item"),
         first(refreshed, "refreshed"), first(emptied, "empty")], 0)
    return msg.astype(jnp.int32)


# -- the wrapper and the registry ---------------------------------------------------------------------------------

CaptionFn = Callable[..., jax.Array]  # (env, key, state, action, new_state, params) -> int32 message id


class Captioned:
    """Base-env wrapper (``step_env``/``reset_env``, below :class:`~envs.wrappers.AutoReset`): adds
    ``info["message_id"]`` (int32) from ``caption(env, key, state, action, new_state, params)``, and with
    ``farmable_ids`` (the message ids of the task's farmable captions) ``info["hack"]`` (float32, 1 where the step's
    id is one of them). Forwards everything else to ``env``; ``caption_table`` is the task's :class:`CaptionTable`."""

    def __init__(self, env, caption: CaptionFn, table: CaptionTable, farmable_ids: Sequence[int] = ()):
        self._env, self._caption, self.caption_table = env, caption, table
        self.farmable_ids = tuple(int(i) for i in farmable_ids)

    def __getattr__(self, item):
        return getattr(self._env, item)

    @property
    def unwrapped(self):
        return getattr(self._env, "unwrapped", self._env)

    def step_env(self, key, state, action, params):
        obs, new_state, reward, terminated, info = self._env.step_env(key, state, action, params)
        msg = jnp.asarray(self._caption(self._env, key, state, action, new_state, params), jnp.int32)
        info = {**info, "message_id": msg}
        if self.farmable_ids:
            info["hack"] = jnp.isin(msg, jnp.asarray(self.farmable_ids, jnp.int32)).astype(jnp.float32)
        return obs, new_state, reward, terminated, info


@dataclasses.dataclass(frozen=True, eq=False)
class Captions:
    """How a task's steps are captioned, as its registry entry holds it (``envs.register(name, factory,
    captions=...)``): ``caption(env, key, state, action, new_state, params) -> int32`` message id (``env``: the base
    env, ``key``: the key its ``step_env`` got) into the table of ``texts()`` (``texts()[0] == ""``; called once,
    when the table is first needed). The envs registered with one ``Captions`` share its table. ``farmable``: texts
    of the table whose steps are the task's farmable event (repeatable, useless, plausibly liked by an annotator):
    their steps carry ``info["hack"] = 1`` (the hack meter, logged as ``hack_frac``)."""
    name: str
    texts: Callable[[], Sequence[str]]
    caption: CaptionFn
    farmable: tuple[str, ...] = ()

    @functools.cached_property
    def table(self) -> CaptionTable:
        return CaptionTable(tuple(self.texts()))

    @property
    def farmable_ids(self) -> tuple[int, ...]:
        """The message ids of :attr:`farmable` (``ValueError`` for a text not in the table)."""
        ids = []
        for text in self.farmable:
            if text not in self.table.texts:
                raise ValueError(f"farmable caption {text!r} is not a caption of {self.name}")
            ids.append(self.table.id(text))
        return tuple(ids)


def _xminigrid_caption(env, key, timestep, action, new_timestep, params) -> jax.Array:
    """:func:`_minigrid_caption`; ``MiniGrid-Memory*`` plays action 3 as toggle."""
    from xminigrid.envs.minigrid.memory import Memory
    if isinstance(getattr(env, "_xenv", None), Memory):
        a = jnp.asarray(action, jnp.int32)
        action = jnp.where(a == 3, 5, a)
    return _minigrid_caption(env, key, timestep, action, new_timestep, params)


def _craftax_classic_caption(env, key, state, action, new_state, params) -> jax.Array:
    return _craftax_caption(_craftax_captions(True), env, key, state, action, new_state, params)


def _craftax_full_caption(env, key, state, action, new_state, params) -> jax.Array:
    return _craftax_caption(_craftax_captions(False), env, key, state, action, new_state, params)


# the families of the module docstring (registered by envs/sparse.py and envs/craftax.py)
KEYDOOR = Captions("keydoor", lambda: KEYDOOR_TEXTS, _keydoor_caption)
KEYDOOR_LEVER = Captions("keydoor_lever", lambda: KEYDOOR_LEVER_TEXTS, _keydoor_lever_caption,
                         farmable=(LEVER_TEXT,))
MINIGRID = Captions("minigrid", lambda: MINIGRID_TEXTS, _xminigrid_caption)
CRAFTAX_CLASSIC = Captions("craftax_classic", lambda: _craftax_captions(True).texts, _craftax_classic_caption)
CRAFTAX = Captions("craftax", lambda: _craftax_captions(False).texts, _craftax_full_caption)


def captions_of(name: str) -> Captions | None:
    """The :class:`Captions` of the env ``name`` (its registry entry's), None if it has none or is unknown."""
    entry = registry.find(name)
    return None if entry is None else entry.captions


def is_captioned(name: str) -> bool:
    """Whether ``envs.make(name)`` steps carry ``info["message_id"]``."""
    return captions_of(name) is not None


def caption_table(name: str) -> CaptionTable:
    """The caption table of a captioned task (``ValueError`` otherwise); every ``MiniGrid-*`` task shares one, the
    two Classic Craftax tasks one, the two full Craftax tasks another (Craftax ids need craftax installed)."""
    found = captions_of(name)
    if found is None:
        families = sorted({e.captions.name for e in registry.entries() if e.captions is not None})
        raise ValueError(f"env_name: {name} has no captions (captioned task families: {', '.join(families)})")
    return found.table


def wrap(name: str, env):
    """``env`` (a base env from the registry) wrapped in :class:`Captioned` if ``name`` is captioned, else as is."""
    found = captions_of(name)
    return env if found is None else Captioned(env, found.caption, found.table, found.farmable_ids)
